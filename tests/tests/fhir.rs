//! The FHIR R4 API as a ward workstation uses it: real HTTPS against the real daemon.

use std::time::Duration;

use hms_edge::keys::Key;
use hms_edge::store::StoreOptions;
use hms_edge_tests::{DaemonOptions, DaemonProc, fhir_client};
use reqwest::blocking::{Client, Response};
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};

const FHIR_JSON: &str = "application/fhir+json";

struct Fhir {
    d: DaemonProc,
    c: Client,
    base: String,
    _dir: tempfile::TempDir,
}

fn start_with(env: &[(&str, &str)]) -> Fhir {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    for (k, v) in env {
        opts.env.insert((*k).into(), (*v).into());
    }
    let d = DaemonProc::start(dir.path(), &opts);
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let base = d.fhir_base();
    Fhir { d, c, base, _dir: dir }
}

fn start() -> Fhir {
    start_with(&[])
}

impl Fhir {
    fn get(&self, path: &str) -> Response {
        self.c.get(format!("{}/{path}", self.base)).send().unwrap()
    }
    fn post(&self, path: &str, body: &Value) -> Response {
        self.c
            .post(format!("{}/{path}", self.base))
            .header(CONTENT_TYPE, FHIR_JSON)
            .body(body.to_string())
            .send()
            .unwrap()
    }
    fn put(&self, path: &str, body: &Value) -> Response {
        self.c
            .put(format!("{}/{path}", self.base))
            .header(CONTENT_TYPE, FHIR_JSON)
            .body(body.to_string())
            .send()
            .unwrap()
    }
    fn json(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().unwrap()
    }
    /// Every resource id of a searchset bundle (matches only), following `next` links.
    fn search_ids(&self, path: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut url = format!("{}/{path}", self.base);
        loop {
            let r = self.c.get(&url).send().unwrap();
            assert_eq!(r.status(), 200, "GET {url}");
            let b: Value = r.json().unwrap();
            for e in b["entry"].as_array().cloned().unwrap_or_default() {
                if e["search"]["mode"] == "match" {
                    out.push(e["resource"]["id"].as_str().unwrap().to_owned());
                }
            }
            match b["link"].as_array().and_then(|l| l.iter().find(|x| x["relation"] == "next")) {
                Some(n) => url = n["url"].as_str().unwrap().to_owned(),
                None => return out,
            }
        }
    }
    fn history_len(&self) -> usize {
        self.json("_history?_count=1000")["entry"].as_array().map_or(0, Vec::len)
    }
}

fn is_outcome(r: Response, status: u16) -> Value {
    assert_eq!(r.status(), status);
    assert!(r.headers()[CONTENT_TYPE].to_str().unwrap().starts_with(FHIR_JSON));
    let b: Value = r.json().unwrap();
    assert_eq!(b["resourceType"], "OperationOutcome", "{b}");
    b
}

fn patient(family: &str, given: &str, mrn: &str, birth: &str) -> Value {
    json!({"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": mrn}],
           "name": [{"family": family, "given": [given]}], "gender": "female", "birthDate": birth})
}

#[test]
fn crud_versions_history_and_conditional_create() {
    let f = start();
    let r = f.post("Patient", &patient("Müller", "Zoë", "MRN-1", "1980-05-02"));
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(loc.contains("/fhir/Patient/") && loc.ends_with("/_history/1"), "{loc}");
    assert!(r.headers().contains_key("last-modified"));
    let created: Value = r.json().unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["meta"]["versionId"], "1");

    let got = f.json(&format!("Patient/{id}"));
    assert_eq!(got, created);

    // Version-aware update.
    let mut v2 = got.clone();
    v2["name"][0]["family"] = json!("Meyer");
    let r =
        f.c.put(format!("{}/Patient/{id}", f.base))
            .header(CONTENT_TYPE, FHIR_JSON)
            .header("If-Match", "W/\"1\"")
            .body(v2.to_string())
            .send()
            .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "W/\"2\"");
    // A stale If-Match is a conflict and changes nothing.
    let r =
        f.c.put(format!("{}/Patient/{id}", f.base))
            .header(CONTENT_TYPE, FHIR_JSON)
            .header("If-Match", "W/\"1\"")
            .body(got.to_string())
            .send()
            .unwrap();
    is_outcome(r, 412);
    assert_eq!(f.json(&format!("Patient/{id}"))["name"][0]["family"], "Meyer");
    assert_eq!(f.json(&format!("Patient/{id}/_history/1"))["name"][0]["family"], "Müller");
    let h = f.json(&format!("Patient/{id}/_history"));
    assert_eq!(h["entry"].as_array().unwrap().len(), 2);

    // Create-on-update with a client id; Prefer: return=minimal.
    let r = f
        .c
        .put(format!("{}/Patient/client-id-1", f.base))
        .header(CONTENT_TYPE, FHIR_JSON)
        .header("Prefer", "return=minimal")
        .body(json!({"resourceType": "Patient", "id": "client-id-1", "active": true}).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.text().unwrap(), "");

    // Conditional create: the second one finds the first.
    let r =
        f.c.post(format!("{}/Patient", f.base))
            .header(CONTENT_TYPE, FHIR_JSON)
            .header("If-None-Exist", "identifier=urn:oid:1.2.3|MRN-1")
            .body(patient("X", "Y", "MRN-1", "1990").to_string())
            .send()
            .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["id"], id.as_str());

    // Delete: 204, then 410 on read, gone from search, history keeps it.
    let r = f.c.delete(format!("{}/Patient/{id}", f.base)).send().unwrap();
    assert_eq!(r.status(), 204);
    is_outcome(f.get(&format!("Patient/{id}")), 410);
    assert!(!f.search_ids("Patient?family=mey").contains(&id));
    assert_eq!(f.json(&format!("Patient/{id}/_history"))["entry"].as_array().unwrap().len(), 3);
    is_outcome(f.get("Patient/does-not-exist"), 404);
}

#[test]
fn bad_input_gets_operation_outcome_and_changes_nothing() {
    let f = start_with(&[("HMS_EDGE_FHIR_MAX_BODY_BYTES", "4096")]);
    f.post("Patient", &patient("A", "B", "1", "2000"));
    let before = f.history_len();
    let raw = |method: reqwest::Method, path: &str, body: &str| {
        f.c.request(method, format!("{}/{path}", f.base))
            .header(CONTENT_TYPE, FHIR_JSON)
            .body(body.to_owned())
            .send()
            .unwrap()
    };
    is_outcome(raw(reqwest::Method::POST, "Patient", "{not json"), 400);
    is_outcome(raw(reqwest::Method::POST, "Patient", "[1,2]"), 400);
    is_outcome(f.post("Patient", &json!({"resourceType": "Observation", "status": "final"})), 400);
    is_outcome(f.put("Patient/abc", &json!({"resourceType": "Patient", "id": "xyz"})), 400);
    is_outcome(f.put("Patient/bad$id", &json!({"resourceType": "Patient", "id": "bad$id"})), 400);
    is_outcome(f.post("Spaceship", &json!({"resourceType": "Spaceship"})), 404);
    is_outcome(f.post("AuditEvent", &json!({"resourceType": "AuditEvent"})), 405);
    let big = json!({"resourceType": "Patient", "text": {"div": "x".repeat(10_000)}});
    is_outcome(f.post("Patient", &big), 413);
    let r =
        f.c.post(format!("{}/Patient", f.base))
            .header(CONTENT_TYPE, "application/xml")
            .body("<Patient/>")
            .send()
            .unwrap();
    is_outcome(r, 415);
    is_outcome(f.get("Patient?birthdate=yesterday"), 400);
    is_outcome(f.get("Patient?_count=many"), 400);
    is_outcome(f.get("Patient?name:sounds=x"), 400);
    is_outcome(f.get("Observation?value-quantity=gtabc"), 400);
    let r =
        f.c.get(format!("{}/Patient?shoe-size=9", f.base))
            .header("Prefer", "handling=strict")
            .send()
            .unwrap();
    is_outcome(r, 400);
    // Lenient (default): ignored with a warning in the Bundle.
    let b = f.json("Patient?shoe-size=9");
    assert!(b.to_string().contains("shoe-size"), "{b}");
    is_outcome(f.get("Binary?x=1"), 400);
    is_outcome(f.get("Patient?_format=xml"), 406);
    // A transaction with one bad entry stores nothing.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": patient("T", "T", "T1", "2001"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "subject": {"reference": "urn:uuid:nope"}},
         "request": {"method": "POST", "url": "Observation"}}]});
    is_outcome(f.post("", &tx), 400);
    assert_eq!(f.history_len(), before, "failed requests must not write anything");
    assert!(f.search_ids("Patient?family=t").is_empty());
    assert_eq!(hms_edge_tests::http_get(f.d.admin, "/healthz").0, 200);
}

#[test]
fn search_semantics() {
    let f = start();
    let p1 = f
        .post("Patient", &patient("Ångström", "Élodie", "M1", "1970-03-04"))
        .json::<Value>()
        .unwrap();
    let p2 =
        f.post("Patient", &patient("Angstrom-Smith", "Bob", "M2", "1985")).json::<Value>().unwrap();
    let _p3 =
        f.post("Patient", &patient("Brown", "Carl", "M3", "2001-12-31")).json::<Value>().unwrap();
    let (id1, id2) = (p1["id"].as_str().unwrap(), p2["id"].as_str().unwrap());
    let mut sorted = vec![id1.to_owned(), id2.to_owned()];
    sorted.sort();
    let mut got = f.search_ids("Patient?family=angstrom");
    got.sort();
    assert_eq!(got, sorted, "string: starts-with, case- and accent-insensitive");
    assert_eq!(f.search_ids("Patient?family:exact=Ångström"), vec![id1]);
    assert_eq!(f.search_ids("Patient?family:contains=smith"), vec![id2]);
    assert_eq!(f.search_ids("Patient?identifier=urn:oid:1.2.3|M2"), vec![id2]);
    assert_eq!(f.search_ids("Patient?identifier=M1"), vec![id1]);
    assert!(f.search_ids("Patient?identifier=urn:other|M1").is_empty());
    assert_eq!(f.search_ids("Patient?birthdate=1970-03"), vec![id1]);
    assert_eq!(f.search_ids("Patient?birthdate=lt1980&birthdate=gt1900"), vec![id1]);
    assert_eq!(f.search_ids("Patient?birthdate=sa2000").len(), 1);
    assert_eq!(
        f.search_ids("Patient?birthdate=ge1985-06").len(),
        2,
        "1985 (year) overlaps ge 1985-06"
    );
    assert_eq!(f.search_ids(&format!("Patient?_id={id1},{id2}")).len(), 2);
    assert_eq!(f.search_ids("Patient?gender:not=female").len(), 0);

    for (i, (code, v, when)) in [
        ("2339-0", 5.5, "2026-01-01T08:00:00Z"),
        ("2339-0", 7.25, "2026-02-01T08:00:00Z"),
        ("8867-4", 80.0, "2026-03-01T08:00:00Z"),
    ]
    .iter()
    .enumerate()
    {
        let o = json!({"resourceType": "Observation", "status": "final", "id": format!("o{i}"),
            "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": "Glucose"},
            "subject": {"reference": format!("Patient/{id1}")}, "effectiveDateTime": when,
            "valueQuantity": {"value": v, "system": "http://unitsofmeasure.org", "code": "mmol/L"}});
        assert_eq!(f.put(&format!("Observation/o{i}"), &o).status(), 201);
    }
    assert_eq!(
        f.search_ids(&format!(
            "Observation?patient={id1}&code=http://loinc.org|2339-0&_sort=-date"
        )),
        vec!["o1", "o0"]
    );
    assert_eq!(
        f.search_ids(&format!("Observation?subject=Patient/{id1}&_sort=date")),
        vec!["o0", "o1", "o2"]
    );
    assert_eq!(
        f.search_ids("Observation?value-quantity=gt6|http://unitsofmeasure.org|mmol/L&code=2339-0"),
        vec!["o1"]
    );
    assert_eq!(f.search_ids("Observation?value-quantity=5.5"), vec!["o0"]);
    assert_eq!(
        f.search_ids("Observation?subject:Patient.identifier=urn:oid:1.2.3|M1").len(),
        3,
        "chained"
    );
    assert_eq!(f.search_ids("Observation?code:text=gluc").len(), 3);
    assert_eq!(f.search_ids("Observation?date=le2026-01-31").len(), 1);
    // _include and _revinclude
    let b = f.json("Observation?_id=o0&_include=Observation:subject");
    assert!(
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["search"]["mode"] == "include" && e["resource"]["id"] == id1)
    );
    let b = f.json(&format!("Patient?_id={id1}&_revinclude=Observation:subject"));
    assert_eq!(b["entry"].as_array().unwrap().len(), 4);
    // _summary=count, _total, _elements
    assert_eq!(f.json("Observation?_summary=count")["total"], 3);
    assert!(f.json("Observation?_total=none").get("total").is_none());
    let b = f.json("Observation?_id=o0&_elements=status");
    let r = &b["entry"][0]["resource"];
    assert!(r.get("status").is_some() && r.get("valueQuantity").is_none());
    // _lastUpdated
    assert_eq!(f.search_ids("Observation?_lastUpdated=gt2020-01-01").len(), 3);
    assert_eq!(f.search_ids("Observation?_lastUpdated=lt2020-01-01").len(), 0);
}

/// Every search parameter the CapabilityStatement advertises is accepted by the search engine
/// (strict handling), and an unadvertised one is refused: the statement says what the code does.
#[test]
fn capability_statement_matches_what_search_accepts() {
    let f = start();
    let cs = f.json("metadata");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    let mut checked = 0;
    for r in resources {
        let t = r["type"].as_str().unwrap();
        let Some(sps) = r["searchParam"].as_array() else {
            if t == "Binary" {
                let resp =
                    f.c.get(format!("{}/Binary?_id=x", f.base))
                        .header("Prefer", "handling=strict")
                        .send()
                        .unwrap();
                assert_eq!(resp.status(), 400);
            }
            continue;
        };
        for sp in sps {
            let name = sp["name"].as_str().unwrap();
            let value = match sp["type"].as_str().unwrap() {
                "date" => "ge2020-01-01",
                "quantity" | "number" => "gt1",
                "reference" => "Patient/x",
                _ => "x",
            };
            let resp =
                f.c.get(format!("{}/{t}?{name}={value}&_count=1", f.base))
                    .header("Prefer", "handling=strict")
                    .send()
                    .unwrap();
            assert_eq!(
                resp.status(),
                200,
                "{t}?{name} is advertised but refused: {}",
                resp.text().unwrap()
            );
            checked += 1;
        }
        let resp =
            f.c.get(format!("{}/{t}?not-a-param=1", f.base))
                .header("Prefer", "handling=strict")
                .send()
                .unwrap();
        assert_eq!(resp.status(), 400);
    }
    assert!(checked > 300, "only {checked} parameters advertised");
}

#[test]
fn paging_is_stable_under_concurrent_writes() {
    let f = start();
    for i in 0..25 {
        f.put(
            &format!("Patient/p{i:02}"),
            &json!({"resourceType": "Patient", "id": format!("p{i:02}"), "active": true}),
        );
    }
    let first: Value = f.json("Patient?active=true&_count=10&_sort=_id");
    let mut ids: Vec<String> = first["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .collect();
    // Writes that would sort before the current page land between page fetches.
    for i in 0..5 {
        f.put(
            &format!("Patient/a{i}"),
            &json!({"resourceType": "Patient", "id": format!("a{i}"), "active": true}),
        );
    }
    let mut next = first["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .map(|l| l["url"].as_str().unwrap().to_owned());
    while let Some(url) = next {
        let b: Value = f.c.get(&url).send().unwrap().json().unwrap();
        ids.extend(
            b["entry"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["resource"]["id"].as_str().unwrap().to_owned()),
        );
        next = b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_owned());
    }
    let expected: Vec<String> = (0..25).map(|i| format!("p{i:02}")).collect();
    assert_eq!(ids, expected, "pages shifted under concurrent writes");
    assert_eq!(first["total"], 25);
}

fn synthea_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tarball = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/synthea-r4-100.tar.gz");
    let st = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success(), "cannot unpack {}", tarball.display());
    dir
}

#[test]
fn synthea_bundles_load_with_conditional_references_and_search() {
    let f = start();
    let data = synthea_dir();
    let mut files: Vec<_> =
        std::fs::read_dir(data.path()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort(); // 0-hospital…, 0-practitioner… first
    let mut patients = 0;
    for path in files.iter().take(2 + 5) {
        let bundle: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let r = f.post("", &bundle);
        assert_eq!(r.status(), 200, "{}: {}", path.display(), r.text().unwrap());
        let resp: Value = r.json().unwrap();
        let n = resp["entry"].as_array().unwrap().len();
        assert_eq!(n, bundle["entry"].as_array().unwrap().len());
        if bundle["type"] == "transaction" {
            patients += 1;
            for e in resp["entry"].as_array().unwrap() {
                assert!(e["response"]["status"].as_str().unwrap().starts_with("201"), "{e}");
            }
        }
    }
    // Loading the hospital batch twice creates nothing new (ifNoneExist).
    let hosp: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    let resp: Value = f.post("", &hosp).json().unwrap();
    assert!(resp["entry"].as_array().unwrap().iter().all(|e| e["response"]["status"] == "200"));

    let pats = f.search_ids("Patient?_count=100");
    assert_eq!(pats.len(), patients);
    // urn:uuid references were rewritten: each patient's observations are found by patient.
    let pid = &pats[0];
    let obs = f.json(&format!("Observation?patient={pid}&_sort=-date&_count=20"));
    assert!(obs["total"].as_u64().unwrap() > 0, "{obs}");
    let dates: Vec<&str> = obs["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["resource"]["effectiveDateTime"].as_str())
        .collect();
    let mut sorted = dates.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(dates, sorted, "_sort=-date");
    // Conditional references to the hospital's organizations were resolved to real ids.
    let enc =
        f.json(&format!("Encounter?patient={pid}&_count=1&_include=Encounter:service-provider"));
    let entry = &enc["entry"][0]["resource"];
    let org_ref = entry["serviceProvider"]["reference"].as_str().unwrap();
    assert!(org_ref.starts_with("Organization/") && !org_ref.contains('?'), "{org_ref}");
    assert!(enc["entry"].as_array().unwrap().iter().any(|e| e["search"]["mode"] == "include"));
    // $everything pages through the whole compartment.
    let every = f.json(&format!("Patient/{pid}/$everything?_count=50"));
    assert!(every["total"].as_u64().unwrap() > 50);
}

#[test]
fn every_access_is_audited_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    let d = DaemonProc::start(dir.path(), &opts);
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let base = d.fhir_base();
    let r = c
        .post(format!("{base}/Patient"))
        .header(CONTENT_TYPE, FHIR_JSON)
        .body(patient("Aud", "It", "A1", "1999").to_string())
        .send()
        .unwrap();
    let id = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(c.get(format!("{base}/Patient/{id}")).send().unwrap().status(), 200);
    assert_eq!(c.get(format!("{base}/Patient?family=aud")).send().unwrap().status(), 200);
    assert_eq!(c.get(format!("{base}/Patient/nope")).send().unwrap().status(), 404);
    std::thread::sleep(Duration::from_millis(300));
    let state = d.state_dir();
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
    let key = hms_edge::keys::load_key_file(&state.join("master.key")).unwrap();
    let store =
        hms_edge::store::open(&state, &Key::from_bytes(*key.expose()), &StoreOptions::default())
            .unwrap();
    let rows: Vec<(String, String, String, String)> = store
        .read_blocking(|c| {
            let mut s =
                c.prepare("SELECT action, entity, outcome, source FROM audit_events ORDER BY seq")?;
            let rows = s
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
        .unwrap();
    let has = |a: &str, e: &str, o: &str| {
        rows.iter().any(|r| r.0 == a && r.1.starts_with(e) && r.2 == o && r.3 == "127.0.0.1")
    };
    assert!(has("create", &format!("Patient/{id}"), "success"), "{rows:?}");
    assert!(has("read", &format!("Patient/{id}"), "success"), "{rows:?}");
    assert!(has("search", "Patient?", "success"), "{rows:?}");
    assert!(has("read", "Patient/nope", "404"), "{rows:?}");
    // The write is in the change log for the sync agent, in the same transaction.
    let n: i64 = store
        .read_blocking(|c| {
            Ok(c.query_row(
                "SELECT count(*) FROM outbox WHERE kind='fhir' AND entity=?1",
                [format!("Patient/{id}")],
                |r| r.get(0),
            )?)
        })
        .unwrap();
    assert_eq!(n, 1);
}

/// The official R4 examples (npm `hl7.fhir.r4.examples`, fetched by `scripts/setup-test-deps`):
/// every example of a resource type we store must round-trip — PUT it, GET it back, equal apart
/// from `meta.versionId`/`meta.lastUpdated`, decimals keeping their written precision.
#[test]
fn official_r4_examples_round_trip() {
    let dir = std::env::var("HMS_FHIR_EXAMPLES")
        .unwrap_or_else(|_| "/var/cache/hms-edge/fhir-r4-examples".into());
    let pkg = std::path::Path::new(&dir).join("package");
    assert!(
        pkg.join("Patient-example.json").exists(),
        "run scripts/setup-test-deps: {} is missing",
        pkg.display()
    );
    let f = start();
    let mut done = 0;
    let mut invalid_ids = 0;
    let mut files: Vec<_> = std::fs::read_dir(&pkg).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".json") || name == "package.json" || name.starts_with('.') {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let Ok(example) = serde_json::from_str::<Value>(&text) else { continue };
        let (Some(t), Some(id)) = (example["resourceType"].as_str(), example["id"].as_str()) else {
            continue;
        };
        if !hms_edge::fhir::is_resource_type(t) || hms_edge::fhir::READ_ONLY_TYPES.contains(&t) {
            continue;
        }
        if !hms_edge::fhir::valid_id(id) {
            // A few examples carry ids longer than R4's 64-character limit: refused, correctly.
            assert_eq!(f.put(&format!("{t}/{id}"), &example).status(), 400, "{name}");
            invalid_ids += 1;
            continue;
        }
        let r = f.put(&format!("{t}/{id}"), &example);
        assert!(
            r.status() == 200 || r.status() == 201,
            "{name}: {} {}",
            r.status(),
            r.text().unwrap()
        );
        let mut back = f.json(&format!("{t}/{id}"));
        let strip = |v: &mut Value| {
            if let Some(m) = v.get_mut("meta").and_then(Value::as_object_mut) {
                m.remove("versionId");
                m.remove("lastUpdated");
                if m.is_empty() {
                    v.as_object_mut().unwrap().remove("meta");
                }
            }
        };
        let mut orig = example.clone();
        strip(&mut orig);
        strip(&mut back);
        if back != orig {
            panic!(
                "{name} did not round-trip: first difference at {}",
                first_diff(&back, &orig, String::new())
            );
        }
        done += 1;
    }
    assert!(done > 2000, "only {done} examples round-tripped");
    assert!(invalid_ids < 20, "{invalid_ids} examples with invalid ids");
    eprintln!("{done} official examples round-tripped ({invalid_ids} with over-long ids refused)");
}

/// Path and values of the first difference between two JSON values (short, for messages).
fn first_diff(a: &Value, b: &Value, path: String) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) if p == q => {}
                    (Some(p), Some(q)) => return first_diff(p, q, format!("{path}/{k}")),
                    (p, q) => return format!("{path}/{k}: {} vs {}", short(p), short(q)),
                }
            }
            format!("{path}: equal")
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                if p != q {
                    return first_diff(p, q, format!("{path}/{i}"));
                }
            }
            format!("{path}: equal")
        }
        _ => format!("{path}: {} vs {}", short(Some(a)), short(Some(b))),
    }
}

fn short(v: Option<&Value>) -> String {
    let s = v.map_or("<absent>".to_string(), Value::to_string);
    s.chars().take(120).collect()
}

/// Random search requests (real parameter names with modifiers, chains and garbage values) and
/// random bodies against the live server: never a 500.
#[test]
fn random_requests_never_get_a_500() {
    use rand::Rng;
    let f = start();
    f.post("Patient", &patient("Rand", "Om", "R1", "1990-01-01"));
    let mut rng = rand::rng();
    let names: Vec<String> = hms_edge::fhir::params::params_for("Observation")
        .unwrap()
        .iter()
        .chain(hms_edge::fhir::params::params_for("Patient").unwrap())
        .map(|p| p.code.to_string())
        .chain(
            [
                "_id",
                "_lastUpdated",
                "_sort",
                "_include",
                "_revinclude",
                "_count",
                "_elements",
                "_total",
            ]
            .map(String::from),
        )
        .collect();
    let pieces = [
        "",
        ":exact",
        ":contains",
        ":not",
        ":text",
        ":missing",
        ":Patient",
        ".identifier",
        ":Patient.name",
        ".nope",
        ":",
    ];
    let values = [
        "",
        "x",
        "gt2020",
        "le2020-13-01",
        "eq1.5",
        "ap-3",
        "a|b",
        "|",
        "http://x|",
        "Patient/1",
        "1e999",
        "NaN",
        "%00",
        "'; DROP TABLE fhir_current; --",
        "\u{1F600}",
        "true",
        "-date",
        "Observation:subject",
        "*",
        "9999999999999999999",
    ];
    for i in 0..400 {
        let n = rng.random_range(1..4);
        let mut q = Vec::new();
        for _ in 0..n {
            let name = &names[rng.random_range(0..names.len())];
            let m = pieces[rng.random_range(0..pieces.len())];
            let v = values[rng.random_range(0..values.len())];
            q.push((format!("{name}{m}"), v.to_string()));
        }
        let t = if i % 2 == 0 { "Observation" } else { "Patient" };
        let qs = serde_urlencoded::to_string(&q).unwrap();
        let r = f.c.get(format!("{}/{t}?{qs}", f.base)).send().unwrap();
        assert!(r.status().as_u16() < 500, "{t}?{q:?} -> {} {}", r.status(), r.text().unwrap());
    }
    for _ in 0..100 {
        let len = rng.random_range(0..200);
        let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let r =
            f.c.post(format!("{}/Patient", f.base))
                .header(CONTENT_TYPE, FHIR_JSON)
                .body(body)
                .send()
                .unwrap();
        assert_eq!(r.status(), 400);
    }
    assert_eq!(f.search_ids("Patient?family=rand").len(), 1, "the store is intact");
}
