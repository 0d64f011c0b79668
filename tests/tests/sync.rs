//! End to end: DCMTK / a ward workstation → hms-edged → hms-edge-agent → the real upstream peers
//! (sekmet-fhir behind the emulated cloud gateway, Orthanc with DICOMweb, mosquitto).

#[path = "dicom_common/mod.rs"]
mod dicom_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dicom_common::{AE, dcmtk, info, peer, run, testfiles};
use hms_edge::sync::api::StatusResponse;
use hms_edge::sync::client::InternalClient;
use hms_edge_tests::peers::{AgentProc, Peer, plain_client, try_wait_until, wait_until};
use hms_edge_tests::{DaemonOptions, DaemonProc, fhir_client};
use serde_json::{Value, json};

const TENANT: &str = "tenant-a";
const SITE: &str = "site-1";
const CLIENT: &str = "edge-site-1";
const SECRET: &str = "s3cret-for-tests";

/// The whole cast of one test.
struct Cluster {
    dir: tempfile::TempDir,
    gateway: Peer,
    orthanc: Peer,
    mqtt: Peer,
    daemon: Option<DaemonProc>,
    agent: Option<AgentProc>,
    agent_env: Vec<(String, String)>,
}

fn daemon_opts() -> DaemonOptions {
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    opts.env.insert("HMS_EDGE_SITE_TENANT_ID".into(), TENANT.into());
    opts.env.insert("HMS_EDGE_SITE_SITE_ID".into(), SITE.into());
    opts
}

impl Cluster {
    fn start(extra_agent_env: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let peers = dir.path().join("peers");
        std::fs::create_dir_all(peers.join("gw")).unwrap();
        std::fs::create_dir_all(peers.join("orthanc")).unwrap();
        std::fs::create_dir_all(peers.join("mqtt")).unwrap();
        let client = format!("{CLIENT}:{SECRET}:{TENANT}");
        let gateway = Peer::gateway(&peers.join("gw"), &[TENANT, "tenant-b"], &[&client]);
        let orthanc = Peer::orthanc(&peers.join("orthanc"));
        let mqtt = Peer::mosquitto(&peers.join("mqtt"));
        let daemon = DaemonProc::start(dir.path(), &daemon_opts());
        let secret = hms_edge_tests::write_secret(dir.path(), "client-secret", SECRET);
        let mut agent_env: Vec<(String, String)> = [
            ("HMS_EDGE_PATHS_STATE_DIR", dir.path().join("state").display().to_string()),
            ("HMS_EDGE_SITE_TENANT_ID", TENANT.into()),
            ("HMS_EDGE_SITE_SITE_ID", SITE.into()),
            ("HMS_EDGE_UPSTREAM_FHIR_BASE_URL", format!("{}/{{tenant}}/fhir", gateway.str("url"))),
            ("HMS_EDGE_UPSTREAM_TOKEN_URL", format!("{}/oauth2/token", gateway.str("url"))),
            ("HMS_EDGE_UPSTREAM_CLIENT_ID", CLIENT.into()),
            ("HMS_EDGE_UPSTREAM_CLIENT_SECRET_FILE", secret.display().to_string()),
            ("HMS_EDGE_UPSTREAM_INTERVAL_SECS", "1".into()),
            ("HMS_EDGE_UPSTREAM_MAX_BACKOFF_SECS", "2".into()),
            ("HMS_EDGE_UPSTREAM_REQUEST_TIMEOUT_SECS", "10".into()),
            ("HMS_EDGE_PACS_DICOMWEB_URL", orthanc.str("dicomweb_url")),
            ("HMS_EDGE_MQTT_URL", format!("mqtt://127.0.0.1:{}", mqtt.str("port"))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra_agent_env {
            agent_env.retain(|(k2, _)| k2 != k);
            agent_env.push(((*k).to_owned(), (*v).to_owned()));
        }
        Cluster { dir, gateway, orthanc, mqtt, daemon: Some(daemon), agent: None, agent_env }
    }

    fn start_agent(&mut self) {
        self.agent = Some(AgentProc::start(self.dir.path(), &self.agent_env));
    }

    fn daemon(&self) -> &DaemonProc {
        self.daemon.as_ref().unwrap()
    }

    fn restart_daemon(&mut self) {
        self.daemon = None;
        self.daemon = Some(DaemonProc::start(self.dir.path(), &daemon_opts()));
    }

    fn edge(&self) -> (reqwest::blocking::Client, String) {
        let d = self.daemon();
        (fhir_client(&d.state_dir().join("tls/cert.pem")), d.fhir_base())
    }

    fn sekmet(&self) -> String {
        self.gateway.sekmet_base(TENANT)
    }

    fn internal(&self) -> InternalClient {
        InternalClient::new(self.dir.path().join("state/agent.sock"))
    }

    fn status(&self) -> StatusResponse {
        let c = self.internal();
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async { c.get("/v1/status").await.unwrap() })
    }

    fn queue(&self, kind: &str) -> (u64, u64, u64) {
        let s = self.status();
        let c = s.channels.iter().find(|c| c.kind == kind).unwrap();
        (c.pending, c.leased, c.parked)
    }

    /// Like [`wait_until`], but a timeout reports the queues and both processes' logs.
    fn wait<T>(&self, timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
        try_wait_until(timeout, f).unwrap_or_else(|| {
            panic!(
                "timed out after {timeout:?} waiting for {what}\nstatus: {:?}\n{}",
                self.status(),
                self.logs()
            )
        })
    }

    fn logs(&self) -> String {
        format!(
            "--- daemon\n{}\n--- agent\n{}",
            self.daemon.as_ref().map(|d| d.log_text()).unwrap_or_default(),
            self.agent.as_ref().map(|a| a.log_text()).unwrap_or_default()
        )
    }
}

fn get_json(c: &reqwest::blocking::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).header("accept", "application/fhir+json").send().unwrap();
    let s = r.status().as_u16();
    (s, r.json().unwrap_or(Value::Null))
}

fn put_json(c: &reqwest::blocking::Client, url: &str, body: &Value) -> u16 {
    c.put(url)
        .header("content-type", "application/fhir+json")
        .json(body)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

fn without_meta(v: &Value) -> Value {
    let mut v = v.clone();
    v.as_object_mut().unwrap().remove("meta");
    v
}

fn patient(id: &str, family: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "active": true,
           "name": [{"family": family, "given": ["Ada"]}], "gender": "female",
           "birthDate": "1961-02-03"})
}

/// Orthanc's stored file for an instance (REST API), if it has it.
fn orthanc_file(orthanc: &Peer, sop: &str) -> Option<Vec<u8>> {
    let rest = orthanc.str("rest_url");
    let c = plain_client();
    let found: Value =
        c.post(format!("{rest}/tools/lookup")).body(sop.to_owned()).send().ok()?.json().ok()?;
    let id = found.as_array()?.iter().find(|f| f["Type"] == "Instance")?["ID"].as_str()?.to_owned();
    let bytes = c.get(format!("{rest}/instances/{id}/file")).send().ok()?.bytes().ok()?;
    Some(bytes.to_vec())
}

fn orthanc_instance_count(orthanc: &Peer) -> usize {
    let rest = orthanc.str("rest_url");
    let v: Value = plain_client().get(format!("{rest}/instances")).send().unwrap().json().unwrap();
    v.as_array().unwrap().len()
}

/// The bytes hms-edged serves for an instance on its internal API.
fn edge_instance(c: &Cluster, sop: &str) -> Vec<u8> {
    use http_body_util::BodyExt;
    let client = c.internal();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let resp = client
            .send(hyper::Method::GET, &format!("/v1/dicom/instances/{sop}"), None)
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap().to_bytes().to_vec()
    })
}

/// The PACS's file carries the data set the modality sent. (storescu drops a data set's trailing
/// padding (FFFC,FFFC) when it sends; every other element must be what the modality had.)
fn assert_same_dataset(c: &Cluster, original: &Path, sop: &str, pacs_bytes: &[u8]) {
    let got = c.dir.path().join(format!("{sop}.dcm"));
    std::fs::write(&got, pacs_bytes).unwrap();
    let cmp = peer(&["compare", original.to_str().unwrap(), got.to_str().unwrap()]);
    let differing: Vec<&str> =
        cmp["differing_tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert!(
        cmp["same_dataset"] == true || differing == ["(FFFC,FFFC)"],
        "data set changed on the way: {cmp}"
    );
}

fn storescu(c: &Cluster, files: &[PathBuf]) {
    let port = c.daemon().dicom.port().to_string();
    let out = run(dcmtk("storescu").args(["-R", "-aec", AE, "127.0.0.1", &port]).args(files));
    assert!(out.status.success(), "storescu: {}", String::from_utf8_lossy(&out.stderr));
}

/// A subscriber that writes every message (`topic payload`) into a file.
fn subscribe(c: &Cluster) -> (std::process::Child, PathBuf) {
    let out = c.dir.path().join("mqtt-messages.txt");
    let f = std::fs::File::create(&out).unwrap();
    let child = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &c.mqtt.str("port"), "-v", "-q", "1"])
        .args(["-t", &format!("hms/{TENANT}/{SITE}/events/#")])
        .stdout(Stdio::from(f))
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    (child, out)
}

#[test]
fn workstation_writes_images_and_upstream_changes_flow_both_ways() {
    let mut c = Cluster::start(&[]);
    let (mut sub, messages) = subscribe(&c);
    let (edge, base) = c.edge();
    let up = plain_client();
    let sekmet = c.sekmet();

    // Written at the edge while no agent runs (offline), then the agent starts.
    let pid = "0b9e1f7e-5c1e-4a55-9a51-6c1d2c3b4a01";
    assert_eq!(put_json(&edge, &format!("{base}/Patient/{pid}"), &patient(pid, "Lovelace")), 201);
    let obs = json!({"resourceType": "Observation", "id": "0b9e1f7e-5c1e-4a55-9a51-6c1d2c3b4a02",
        "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{pid}")},
        "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}});
    assert_eq!(
        put_json(&edge, &format!("{base}/Observation/{}", obs["id"].as_str().unwrap()), &obs),
        201
    );
    let files = testfiles(&["CT_small.dcm", "MR_small.dcm"]);
    let facts = info(&files);
    storescu(&c, &files);
    assert_eq!(c.queue("fhir").0, 2, "two FHIR changes wait offline");
    assert_eq!(c.queue("dicom").0, 2, "two instances wait offline");
    c.start_agent();

    // FHIR: upstream holds the same content, tagged with the tenant and naming the site.
    let (_, theirs) = wait_until(Duration::from_secs(60), "Patient upstream", || {
        let (s, v) = get_json(&up, &format!("{sekmet}/Patient/{pid}"));
        (s == 200).then_some((s, v))
    });
    assert_eq!(without_meta(&theirs), without_meta(&patient(pid, "Lovelace")), "{}", c.logs());
    let tags = theirs["meta"]["tag"].as_array().unwrap();
    assert!(
        tags.iter().any(|t| t["system"] == "urn:hms-edge:tenant" && t["code"] == TENANT),
        "{theirs}"
    );
    assert_eq!(theirs["meta"]["source"], format!("urn:hms-edge:site:{SITE}"));
    let (s, o) = get_json(&up, &format!("{sekmet}/Observation/{}", obs["id"].as_str().unwrap()));
    assert_eq!(s, 200);
    assert_eq!(without_meta(&o), obs);

    // DICOM: every instance arrives in Orthanc, byte-identical to what the edge stored, and its
    // data set identical to what the modality sent.
    for (file, fact) in files.iter().zip(&facts) {
        let sop = fact["sop_instance"].as_str().unwrap();
        let bytes = wait_until(Duration::from_secs(60), "instance in Orthanc", || {
            orthanc_file(&c.orthanc, sop)
        });
        assert_eq!(bytes, edge_instance(&c, sop), "Orthanc holds other bytes than the edge stored");
        assert_same_dataset(&c, file, sop, &bytes);
    }
    c.wait(Duration::from_secs(30), "outbox drained", || {
        (c.queue("fhir") == (0, 0, 0) && c.queue("dicom") == (0, 0, 0)).then_some(())
    });

    // Upstream changes reach the edge: an update, a new resource, a delete.
    let mut changed = theirs.clone();
    changed["name"][0]["family"] = json!("Byron");
    assert_eq!(put_json(&up, &format!("{sekmet}/Patient/{pid}"), &changed), 200);
    let new_id = "7d3c2b1a-0000-4000-8000-00000000abcd";
    let org = json!({"resourceType": "Organization", "id": new_id, "name": "Cloud-made clinic"});
    assert_eq!(put_json(&up, &format!("{sekmet}/Organization/{new_id}"), &org), 201);
    wait_until(Duration::from_secs(60), "upstream update at the edge", || {
        let (s, v) = get_json(&edge, &format!("{base}/Patient/{pid}"));
        (s == 200 && v["name"][0]["family"] == "Byron").then_some(())
    });
    wait_until(Duration::from_secs(60), "upstream create at the edge", || {
        let (s, v) = get_json(&edge, &format!("{base}/Organization/{new_id}"));
        (s == 200 && v["name"] == "Cloud-made clinic").then_some(())
    });
    let del = up.delete(format!("{sekmet}/Organization/{new_id}")).send().unwrap();
    assert!(del.status().is_success());
    wait_until(Duration::from_secs(60), "upstream delete at the edge", || {
        let (s, _) = get_json(&edge, &format!("{base}/Organization/{new_id}"));
        (s == 410).then_some(())
    });
    // Pulled changes are not echoed back as edge changes.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.queue("fhir"), (0, 0, 0), "pulled data must not be pushed back");
    let (_, hist) = get_json(&up, &format!("{sekmet}/Patient/{pid}/_history"));
    assert_eq!(hist["total"], 2, "upstream wrote the patient exactly twice: {hist}");

    // A resource upstream that carries another tenant's tag is refused at the edge and reported.
    let foreign = "7d3c2b1a-0000-4000-8000-00000000beef";
    let mut other = patient(foreign, "Foreign");
    other["meta"] = json!({"tag": [{"system": "urn:hms-edge:tenant", "code": "tenant-b"}]});
    assert_eq!(put_json(&up, &format!("{sekmet}/Patient/{foreign}"), &other), 201);
    c.wait(Duration::from_secs(60), "foreign resource reported", || {
        let t = std::fs::read_to_string(&messages).unwrap_or_default();
        t.contains("/events/sync.rejected").then_some(())
    });
    assert_eq!(get_json(&edge, &format!("{base}/Patient/{foreign}")).0, 404, "never stored");

    // Events: study.received and sync.progress on the broker, without PHI.
    let text = wait_until(Duration::from_secs(30), "events on the broker", || {
        let t = std::fs::read_to_string(&messages).unwrap_or_default();
        (t.contains("/events/study.received") && t.contains("/events/sync.progress")).then_some(t)
    });
    assert!(!text.contains("Lovelace") && !text.contains("Byron"), "PHI in events: {text}");
    let _ = sub.kill();
    let _ = sub.wait();

    // Status as site IT sees it.
    let s = c.status();
    assert_eq!(s.tenant_id, TENANT);
    assert_eq!(s.agent["fhir"]["link"], "up", "{:?}", s.agent);
    assert!(s.agent["dicom"]["sent"].as_u64().unwrap() >= 2, "{:?}", s.agent);
}

/// Every resource of a type upstream: id → resource (sekmet search, paged).
fn upstream_all(c: &Cluster, rtype: &str) -> std::collections::HashMap<String, Value> {
    let up = plain_client();
    let mut out = std::collections::HashMap::new();
    let mut offset = 0;
    loop {
        let url = format!("{}/{rtype}?_count=1000&_offset={offset}", c.sekmet());
        let (s, page) = get_json(&up, &url);
        assert_eq!(s, 200, "{page}");
        let entries = page["entry"].as_array().cloned().unwrap_or_default();
        for e in &entries {
            let r = &e["resource"];
            let prev = out.insert(r["id"].as_str().unwrap().to_owned(), r.clone());
            assert!(prev.is_none(), "{rtype}/{} listed twice upstream", r["id"]);
        }
        if entries.is_empty() {
            return out;
        }
        offset += entries.len();
    }
}

fn edge_transaction(c: &reqwest::blocking::Client, base: &str, resources: &[Value]) {
    let entries: Vec<Value> = resources
        .iter()
        .map(|r| {
            let url =
                format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
            json!({"resource": r, "request": {"method": "PUT", "url": url}})
        })
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let r =
        c.post(base).header("content-type", "application/fhir+json").json(&bundle).send().unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
}

fn uuid(prefix: u32, n: u32) -> String {
    format!("{prefix:08x}-0000-4000-8000-{n:012x}")
}

/// The outage acceptance: ≥ 10k FHIR changes and ≥ 500 instances written while upstream is away,
/// then drained while the agent and the daemon are killed with SIGKILL several times. Upstream
/// ends with exactly the expected set and the outbox is empty.
#[test]
fn outage_backlog_drains_exactly_once_through_sigkills() {
    const PATIENTS: u32 = 2000;
    const OBSERVATIONS: u32 = 6000;
    const INSTANCES: usize = 500;
    let mut c = Cluster::start(&[]);
    // The WAN is down: the gateway refuses connections, the PACS is frozen (a black hole).
    c.gateway.control(json!({"down": "refuse"}));
    let orthanc_pid = nix::unistd::Pid::from_raw(c.orthanc.info["pid"].as_i64().unwrap() as i32);
    nix::sys::signal::kill(orthanc_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    c.start_agent();

    let (edge, base) = c.edge();
    let patients: Vec<Value> =
        (0..PATIENTS).map(|i| patient(&uuid(1, i), &format!("P{i}"))).collect();
    for chunk in patients.chunks(500) {
        edge_transaction(&edge, &base, chunk);
    }
    let observations: Vec<Value> = (0..OBSERVATIONS)
        .map(|i| {
            json!({"resourceType": "Observation", "id": uuid(2, i), "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": format!("Patient/{}", uuid(1, i % PATIENTS))},
                "valueQuantity": {"value": 60 + (i % 40), "unit": "/min",
                                  "system": "http://unitsofmeasure.org", "code": "/min"}})
        })
        .collect();
    for chunk in observations.chunks(500) {
        edge_transaction(&edge, &base, chunk);
    }
    // Every patient changed a second time during the outage.
    let updated: Vec<Value> =
        (0..PATIENTS).map(|i| patient(&uuid(1, i), &format!("P{i}-v2"))).collect();
    for chunk in updated.chunks(500) {
        edge_transaction(&edge, &base, chunk);
    }
    let src = testfiles(&["CT_small.dcm"]);
    let clones = c.dir.path().join("clones");
    std::fs::create_dir_all(&clones).unwrap();
    let sops: Vec<String> = serde_json::from_value(peer(&[
        "clone",
        src[0].to_str().unwrap(),
        clones.to_str().unwrap(),
        &INSTANCES.to_string(),
        "100",
    ]))
    .unwrap();
    let files: Vec<PathBuf> = (0..INSTANCES).map(|i| clones.join(format!("{i:06}.dcm"))).collect();
    storescu(&c, &files);
    let (pending, _, _) = c.queue("fhir");
    assert!(pending + c.queue("fhir").1 >= 10_000, "{:?}", c.status());
    assert_eq!(c.queue("dicom").0 + c.queue("dicom").1, INSTANCES as u64);
    std::thread::sleep(Duration::from_secs(3));
    let s = c.status();
    assert_eq!(s.agent["fhir"]["link"], "down", "{:?}", s.agent);

    // The link returns; both processes are killed while the backlog drains.
    c.gateway.control(json!({"down": false}));
    nix::sys::signal::kill(orthanc_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(1500));
        if round % 2 == 0 {
            c.agent.as_mut().unwrap().kill9();
            c.start_agent();
        } else {
            c.daemon.as_ref().unwrap().signal(nix::sys::signal::Signal::SIGKILL);
            c.restart_daemon();
        }
    }
    c.wait(Duration::from_secs(120), "backlog drained", || {
        (c.queue("fhir") == (0, 0, 0) && c.queue("dicom") == (0, 0, 0)).then_some(())
    });

    let mut up_patients = upstream_all(&c, "Patient");
    // The ImagingStudy refresher made one Patient for the images' DICOM PatientID: it is an
    // edge change too, and must be upstream exactly once.
    let from_dicom: Vec<String> = up_patients
        .iter()
        .filter(|(_, p)| p["identifier"][0]["system"] == "urn:hms-edge:dev-site:patient-id")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(from_dicom.len(), 1, "one Patient for the DICOM PatientID");
    up_patients.remove(&from_dicom[0]);
    assert_eq!(up_patients.len(), PATIENTS as usize, "patients upstream");
    for p in &updated {
        let theirs = &up_patients[p["id"].as_str().unwrap()];
        assert_eq!(without_meta(theirs), *p, "latest edge version upstream");
    }
    let up_obs = upstream_all(&c, "Observation");
    assert_eq!(up_obs.len(), OBSERVATIONS as usize, "observations upstream");
    for o in &observations {
        assert_eq!(without_meta(&up_obs[o["id"].as_str().unwrap()]), *o);
    }
    assert_eq!(orthanc_instance_count(&c.orthanc), INSTANCES, "instances in the PACS");
    for sop in sops.iter().step_by(50) {
        assert_eq!(orthanc_file(&c.orthanc, sop).unwrap(), edge_instance(&c, sop));
    }
}

fn hms_edge_cli(c: &Cluster, args: &[&str]) -> (bool, String) {
    let out = Command::new(hms_edge_tests::bin("hms-edge"))
        .args(args)
        .env_clear()
        .env("HMS_EDGE_PATHS_STATE_DIR", c.dir.path().join("state"))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

fn conflicts(c: &Cluster) -> Vec<hms_edge::sync::api::Conflict> {
    let client = c.internal();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { client.get("/v1/conflicts").await.unwrap() })
}

/// One resource changed at the edge and upstream during an outage, under each policy.
#[test]
fn conflicts_end_per_policy_with_the_loser_kept() {
    let mut c = Cluster::start(&[]);
    let (edge, base) = c.edge();
    let up = plain_client();
    let sekmet = c.sekmet();
    let ids = [uuid(7, 1), uuid(7, 2), uuid(7, 3)];
    for id in &ids {
        assert_eq!(put_json(&edge, &format!("{base}/Patient/{id}"), &patient(id, "Original")), 201);
    }
    c.start_agent();
    c.wait(Duration::from_secs(60), "first push", || (c.queue("fhir") == (0, 0, 0)).then_some(()));

    for (id, policy) in ids.iter().zip(["server-wins", "client-wins", "manual"]) {
        // Outage: the agent is gone, both sides change the same patient.
        c.agent.as_mut().unwrap().kill9();
        assert_eq!(put_json(&edge, &format!("{base}/Patient/{id}"), &patient(id, "EdgeName")), 200);
        let (_, mut theirs) = get_json(&up, &format!("{sekmet}/Patient/{id}"));
        theirs["name"][0]["family"] = json!("CloudName");
        assert_eq!(put_json(&up, &format!("{sekmet}/Patient/{id}"), &theirs), 200);
        c.agent_env.retain(|(k, _)| k != "HMS_EDGE_UPSTREAM_CONFLICT_POLICY");
        c.agent_env.push(("HMS_EDGE_UPSTREAM_CONFLICT_POLICY".into(), policy.into()));
        c.start_agent();
        let conflict = c.wait(Duration::from_secs(60), "conflict recorded", || {
            conflicts(&c).into_iter().find(|x| x.entity == format!("Patient/{id}"))
        });
        assert_eq!(conflict.policy, policy);
        let family = |url: String, client: &reqwest::blocking::Client| {
            get_json(client, &url).1["name"][0]["family"].as_str().unwrap_or("").to_owned()
        };
        match policy {
            "server-wins" => {
                c.wait(Duration::from_secs(30), "upstream version at the edge", || {
                    (family(format!("{base}/Patient/{id}"), &edge) == "CloudName").then_some(())
                });
                // The edge's losing version is kept in its history.
                let (_, hist) = get_json(&edge, &format!("{base}/Patient/{id}/_history"));
                assert!(hist.to_string().contains("EdgeName"), "local version kept: {hist}");
                std::thread::sleep(Duration::from_secs(2));
                assert_eq!(family(format!("{sekmet}/Patient/{id}"), &up), "CloudName");
            }
            "client-wins" => {
                c.wait(Duration::from_secs(30), "edge version upstream", || {
                    (family(format!("{sekmet}/Patient/{id}"), &up) == "EdgeName").then_some(())
                });
                // Upstream's losing version stays in upstream's history, and the conflict says so.
                let (_, hist) = get_json(&up, &format!("{sekmet}/Patient/{id}/_history"));
                assert!(hist.to_string().contains("CloudName"), "{hist}");
                assert_eq!(family(format!("{base}/Patient/{id}"), &edge), "EdgeName");
                assert_eq!(conflict.state, "resolved");
            }
            _ => {
                assert_eq!(conflict.state, "open");
                assert_eq!(c.queue("fhir").2, 1, "the edge change is held");
                let (ok, listed) = hms_edge_cli(&c, &["sync", "conflicts", "--open"]);
                assert!(ok && listed.contains(&format!("Patient/{id}")), "{listed}");
                std::thread::sleep(Duration::from_secs(2));
                assert_eq!(family(format!("{sekmet}/Patient/{id}"), &up), "CloudName", "held");
                assert_eq!(family(format!("{base}/Patient/{id}"), &edge), "EdgeName", "held");
                // Site IT decides for the edge's version.
                let (ok, out) = hms_edge_cli(
                    &c,
                    &["sync", "resolve", &conflict.id.to_string(), "--keep", "local"],
                );
                assert!(ok, "{out}");
                c.wait(Duration::from_secs(30), "resolved version upstream", || {
                    (family(format!("{sekmet}/Patient/{id}"), &up) == "EdgeName").then_some(())
                });
                let (ok, listed) = hms_edge_cli(&c, &["sync", "conflicts", "--open"]);
                assert!(ok && !listed.contains(&format!("Patient/{id}")), "{listed}");
            }
        }
    }
    c.wait(Duration::from_secs(30), "queue empty", || (c.queue("fhir") == (0, 0, 0)).then_some(()));
}

/// 5xx, timeouts, truncated JSON and a refusing token endpoint never lose or duplicate a change,
/// and a failing FHIR upstream does not hold up DICOM forwarding.
#[test]
fn bad_upstream_answers_lose_nothing_and_block_no_other_channel() {
    let mut c = Cluster::start(&[("HMS_EDGE_UPSTREAM_REQUEST_TIMEOUT_SECS", "2")]);
    let (edge, base) = c.edge();
    c.start_agent();
    let mut expected = Vec::new();
    let mut write_batch = |n0: u32| {
        let batch: Vec<Value> = (n0..n0 + 100)
            .map(|i| json!({"resourceType": "Organization", "id": uuid(9, i), "name": format!("Org {i}")}))
            .collect();
        edge_transaction(&edge, &base, &batch);
        expected.extend(batch);
    };
    // The token endpoint refuses: FHIR stalls, DICOM still goes out.
    c.gateway.control(json!({"token_fail": 503}));
    write_batch(0);
    let files = testfiles(&["CT_small.dcm", "MR_small.dcm"]);
    storescu(&c, &files);
    c.wait(Duration::from_secs(60), "DICOM forwarded while FHIR fails", || {
        (c.queue("dicom") == (0, 0, 0)).then_some(())
    });
    assert!(c.queue("fhir").0 + c.queue("fhir").1 > 0, "FHIR must still be waiting");
    c.gateway.control(json!({"token_fail": null}));
    // Server errors, then truncated answers (the upstream applied them, the agent cannot tell).
    c.gateway.control(json!({"fail_next": 3, "fail_status": 500}));
    write_batch(100);
    c.wait(Duration::from_secs(60), "after 5xx", || (c.queue("fhir") == (0, 0, 0)).then_some(()));
    c.gateway.control(json!({"malformed_next": 2}));
    write_batch(200);
    c.wait(Duration::from_secs(60), "after malformed", || {
        (c.queue("fhir") == (0, 0, 0)).then_some(())
    });
    // Every token revoked: the next call gets 401, the agent renews once and goes on.
    let before = c.gateway.control(json!({}))["stats"]["tokens_issued"].as_u64().unwrap();
    c.gateway.control(json!({"revoke_tokens": true}));
    write_batch(400);
    c.wait(Duration::from_secs(60), "after revocation", || {
        (c.queue("fhir") == (0, 0, 0)).then_some(())
    });
    let after = c.gateway.control(json!({}))["stats"]["tokens_issued"].as_u64().unwrap();
    assert!(after > before, "a new token was fetched ({before} → {after})");
    // Answers slower than the agent waits (timeouts; the upstream may still apply them).
    c.gateway.control(json!({"delay_ms": 3000}));
    write_batch(300);
    std::thread::sleep(Duration::from_secs(5));
    c.gateway.control(json!({"delay_ms": 0}));
    c.wait(Duration::from_secs(90), "after timeouts", || {
        (c.queue("fhir") == (0, 0, 0)).then_some(())
    });

    let orgs = upstream_all(&c, "Organization");
    assert_eq!(orgs.len(), expected.len(), "exactly the edge's organizations upstream");
    for o in &expected {
        assert_eq!(without_meta(&orgs[o["id"].as_str().unwrap()]), *o);
    }
    assert_eq!(c.queue("fhir"), (0, 0, 0));
    let counters = c.gateway.control(json!({}));
    assert!(counters["stats"]["injected_failures"].as_u64().unwrap_or(0) > 0, "{counters}");
    // Site IT sees the channels in `hms-edge status` and /metrics.
    let (ok, status) = hms_edge_cli(&c, &["status"]);
    assert!(ok && status.contains("fhir") && status.contains("dicom"), "{status}");
    let (code, metrics) = hms_edge_tests::http_get(c.daemon().admin, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("hms_sync_queue_pending{channel=\"fhir\"} 0"), "{metrics}");
    assert!(metrics.contains("hms_sync_bytes_sent{channel=\"dicom\"}"), "{metrics}");
}

/// Header tenant mode: `X-Tenant-ID` instead of the tenant in the path.
#[test]
fn header_tenant_mode_reaches_the_tenant() {
    let mut c = Cluster::start(&[("HMS_EDGE_UPSTREAM_TENANT_MODE", "header")]);
    let url = format!("{}/fhir", c.gateway.str("url"));
    c.agent_env.retain(|(k, _)| k != "HMS_EDGE_UPSTREAM_FHIR_BASE_URL");
    c.agent_env.push(("HMS_EDGE_UPSTREAM_FHIR_BASE_URL".into(), url));
    let (edge, base) = c.edge();
    let id = uuid(5, 1);
    assert_eq!(put_json(&edge, &format!("{base}/Patient/{id}"), &patient(&id, "Header")), 201);
    c.start_agent();
    let up = plain_client();
    let theirs = c.wait(Duration::from_secs(60), "patient upstream", || {
        let (s, v) = get_json(&up, &format!("{}/Patient/{id}", c.sekmet()));
        (s == 200).then_some(v)
    });
    assert_eq!(without_meta(&theirs), patient(&id, "Header"));
    // And nothing landed in the other tenant's server.
    let (s, _) = get_json(&up, &format!("{}/Patient/{id}", c.gateway.sekmet_base("tenant-b")));
    assert_eq!(s, 404);
}

/// C-STORE SCU forwarding (`pacs.mode = "cstore"`), confirmed with C-FIND: every instance
/// reaches Orthanc's DICOM port with the data set the edge received.
#[test]
fn cstore_forwarding_reaches_the_pacs_and_is_confirmed_by_cfind() {
    let mut c = Cluster::start(&[("HMS_EDGE_PACS_MODE", "cstore")]);
    let address = format!("{}@127.0.0.1:{}", c.orthanc.str("aet"), c.orthanc.str("dicom_port"));
    c.agent_env.push(("HMS_EDGE_PACS_DICOM_ADDRESS".into(), address));
    let files = testfiles(&["CT_small.dcm", "MR_small.dcm", "US1_J2KR.dcm"]);
    let facts = info(&files);
    storescu(&c, &files[..2]);
    // JPEG 2000 travels as received (storescu proposes it with -xv).
    let port = c.daemon().dicom.port().to_string();
    let out = run(dcmtk("storescu").args(["-xv", "-aec", AE, "127.0.0.1", &port]).arg(&files[2]));
    assert!(out.status.success(), "storescu -xv: {}", String::from_utf8_lossy(&out.stderr));
    c.start_agent();
    c.wait(Duration::from_secs(60), "instances forwarded", || {
        (c.queue("dicom") == (0, 0, 0)).then_some(())
    });
    for (file, fact) in files.iter().zip(&facts) {
        let sop = fact["sop_instance"].as_str().unwrap();
        let bytes = orthanc_file(&c.orthanc, sop).unwrap_or_else(|| panic!("{sop} not in Orthanc"));
        assert_same_dataset(&c, file, sop, &bytes);
    }
    let s = c.status();
    assert_eq!(s.agent["dicom"]["sent"], 3, "{:?}", s.agent);
}

/// MQTT over TLS with a client certificate: without one the broker refuses the agent and the
/// events wait in the outbox; with one they all arrive.
#[test]
fn mqtt_over_tls_needs_the_client_certificate_and_events_wait_meanwhile() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::start(&[]);
    let pki = c.dir.path().join("mqtt-tls");
    std::fs::create_dir_all(&pki).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct subject names: OpenSSL takes a leaf whose subject equals its issuer's for a
    // self-signed certificate and fails to verify it.
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "hms-edge test broker CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    for (name, sans) in
        [("server", vec!["localhost".to_string()]), ("client", vec!["edge".to_string()])]
    {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(pki.join(format!("{name}.crt")), cert.pem()).unwrap();
        let kp = pki.join(format!("{name}.key"));
        std::fs::write(&kp, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(pki.join("ca.crt"), ca_cert.pem()).unwrap();
    let port = hms_edge_tests::free_port();
    let conf = pki.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\npersistence false\nlog_dest stderr\nlistener {port} 127.0.0.1\n\
             cafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\n\
             require_certificate true\nallow_anonymous true\n",
            pki.display()
        ),
    )
    .unwrap();
    let mut broker = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "TLS broker", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let sub_out = c.dir.path().join("tls-messages.txt");
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "localhost", "-p", &port.to_string(), "-v", "-q", "1"])
        .arg("--cafile")
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("client.crt"))
        .arg("--key")
        .arg(pki.join("client.key"))
        .args(["-t", &format!("hms/{TENANT}/{SITE}/events/#")])
        .stdout(Stdio::from(std::fs::File::create(&sub_out).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let set = |c: &mut Cluster, k: &str, v: String| {
        c.agent_env.retain(|(k2, _)| k2 != k);
        c.agent_env.push((k.to_owned(), v));
    };
    set(&mut c, "HMS_EDGE_MQTT_URL", format!("mqtts://localhost:{port}"));
    set(&mut c, "HMS_EDGE_MQTT_CA_FILE", pki.join("ca.crt").display().to_string());
    // First without a client certificate: refused by the broker.
    c.start_agent();
    storescu(&c, &testfiles(&["CT_small.dcm"]));
    std::thread::sleep(Duration::from_secs(4));
    let (pending, leased, _) = c.queue("event");
    assert!(pending + leased > 0, "events wait in the outbox: {:?}", c.status());
    assert_eq!(c.status().agent["event"]["link"], "down");
    // With the certificate: everything that waited arrives.
    c.agent.as_mut().unwrap().kill9();
    set(&mut c, "HMS_EDGE_MQTT_CLIENT_CERT_FILE", pki.join("client.crt").display().to_string());
    set(&mut c, "HMS_EDGE_MQTT_CLIENT_KEY_FILE", pki.join("client.key").display().to_string());
    c.start_agent();
    c.wait(Duration::from_secs(60), "events delivered over TLS", || {
        let t = std::fs::read_to_string(&sub_out).unwrap_or_default();
        (t.contains("/events/study.received") && c.queue("event") == (0, 0, 0)).then_some(())
    });
    let _ = sub.kill();
    let _ = sub.wait();
    let _ = broker.kill();
    let _ = broker.wait();
}

/// A fresh box pulls a tenant's existing data page by page; the agent killed in the middle
/// resumes from the page it reached, and the edge ends with every resource exactly as upstream.
#[test]
fn initial_pull_is_resumable_after_sigkill() {
    const N: u32 = 3000;
    let mut c = Cluster::start(&[("HMS_EDGE_UPSTREAM_PULL_PAGE_SIZE", "100")]);
    let up = plain_client();
    let sekmet = c.sekmet();
    let orgs: Vec<Value> = (0..N)
        .map(|i| json!({"resourceType": "Organization", "id": uuid(11, i), "name": format!("Cloud org {i}"),
                        "meta": {"tag": [{"system": "urn:hms-edge:tenant", "code": TENANT}]}}))
        .collect();
    for chunk in orgs.chunks(500) {
        let entries: Vec<Value> = chunk
            .iter()
            .map(|r| {
                json!({"resource": r, "request": {"method": "PUT",
                            "url": format!("Organization/{}", r["id"].as_str().unwrap())}})
            })
            .collect();
        let r = up
            .post(&sekmet)
            .header("content-type", "application/fhir+json")
            .json(&json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    let (edge, base) = c.edge();
    let count_at_edge = |edge: &reqwest::blocking::Client| -> u64 {
        let (_, v) = get_json(edge, &format!("{base}/Organization?_summary=count"));
        v["total"].as_u64().unwrap_or(0)
    };
    c.start_agent();
    let partial = c.wait(Duration::from_secs(120), "part of the pull", || {
        let n = count_at_edge(&edge);
        (n >= 300).then_some(n)
    });
    c.agent.as_mut().unwrap().kill9();
    assert!(partial < u64::from(N), "killed mid-pull ({partial} of {N})");
    let cursor: Value = {
        let client = c.internal();
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async { client.get_state("fhir.pull").await.unwrap() })
            .expect("a cursor was saved")
    };
    assert!(cursor["round"]["offset"].as_u64().unwrap_or(0) > 0, "page position saved: {cursor}");
    c.start_agent();
    c.wait(Duration::from_secs(180), "the whole tenant at the edge", || {
        (count_at_edge(&edge) == u64::from(N)).then_some(())
    });
    for o in orgs.iter().step_by(97) {
        let (s, v) = get_json(&edge, &format!("{base}/Organization/{}", o["id"].as_str().unwrap()));
        assert_eq!(s, 200);
        assert_eq!(without_meta(&v), without_meta(o));
    }
    assert_eq!(c.queue("fhir"), (0, 0, 0), "pulled data is not pushed back");
}

/// A TCP relay in front of an upstream that can turn into a black hole: connections stay open,
/// bytes are taken and never delivered, nothing is refused or reset (a WAN link dropping every
/// packet). The fault injector of `black_holed_upstream_mid_drain_loses_and_duplicates_nothing`.
struct BlackHole {
    addr: std::net::SocketAddr,
    on: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl BlackHole {
    fn start(target: std::net::SocketAddr) -> BlackHole {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let on = Arc::new(AtomicBool::new(false));
        let flag = on.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let flag = flag.clone();
                std::thread::spawn(move || {
                    let pump = |mut from: std::net::TcpStream,
                                mut to: std::net::TcpStream,
                                flag: Arc<AtomicBool>| {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if flag.load(Ordering::SeqCst) {
                                        continue; // swallowed
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    };
                    if flag.load(Ordering::SeqCst) {
                        // Accepted, then silence: hold it until the caller gives up.
                        let mut c = client;
                        let _ = std::io::copy(&mut c, &mut std::io::sink());
                        return;
                    }
                    let Ok(server) = std::net::TcpStream::connect(target) else { return };
                    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let f2 = flag.clone();
                    let up = std::thread::spawn(move || pump(c2, s2, f2));
                    pump(server, client, flag);
                    let _ = up.join();
                });
            }
        });
        BlackHole { addr, on }
    }

    fn set(&self, on: bool) {
        self.on.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Issue 16: the upstream link black-holed (not refused) in the middle of a drain. Local writes
/// never notice; the agent's requests time out instead of hanging; once the link is back the
/// backlog drains, every change upstream exactly once (one version each).
#[test]
fn black_holed_upstream_mid_drain_loses_and_duplicates_nothing() {
    const PATIENTS: u32 = 600;
    let mut c = Cluster::start(&[]);
    let gw: std::net::SocketAddr =
        c.gateway.str("url").trim_start_matches("http://").trim_end_matches('/').parse().unwrap();
    let hole = BlackHole::start(gw);
    let via = format!("http://{}", hole.addr);
    for (k, v) in [
        ("HMS_EDGE_UPSTREAM_FHIR_BASE_URL", format!("{via}/{{tenant}}/fhir")),
        ("HMS_EDGE_UPSTREAM_TOKEN_URL", format!("{via}/oauth2/token")),
        ("HMS_EDGE_UPSTREAM_REQUEST_TIMEOUT_SECS", "5".to_string()),
    ] {
        c.agent_env.retain(|(k2, _)| k2 != k);
        c.agent_env.push((k.into(), v));
    }
    c.start_agent();
    let (edge, base) = c.edge();
    let patients: Vec<Value> =
        (0..PATIENTS).map(|i| patient(&uuid(7, i), &format!("B{i}"))).collect();
    for chunk in patients[..300].chunks(100) {
        edge_transaction(&edge, &base, chunk);
    }
    // Mid-drain: some changes are upstream, some are not yet.
    c.wait(Duration::from_secs(60), "the drain under way", || {
        let (p, l, _) = c.queue("fhir");
        (p + l < 300).then_some(())
    });
    hole.set(true);
    // The ward keeps writing: every local write is acknowledged at once.
    for chunk in patients[300..].chunks(100) {
        edge_transaction(&edge, &base, chunk);
    }
    std::thread::sleep(Duration::from_secs(15));
    let (pending, leased, parked) = c.queue("fhir");
    assert!(pending + leased > 0, "nothing waited while the link was a black hole");
    assert_eq!(parked, 0, "changes parked because of a network fault");
    let held = pending + leased;
    hole.set(false);
    c.wait(Duration::from_secs(180), "backlog drained after the black hole", || {
        (c.queue("fhir") == (0, 0, 0)).then_some(())
    });
    let up = upstream_all(&c, "Patient");
    let ours: Vec<&Value> =
        up.values().filter(|p| p["id"].as_str().unwrap().starts_with("00000007")).collect();
    assert_eq!(ours.len(), PATIENTS as usize, "patients upstream");
    // Exactly once: one version each upstream, whatever the lost answers were.
    let plain = plain_client();
    let mut twice = Vec::new();
    for p in patients.iter().step_by(20) {
        let id = p["id"].as_str().unwrap();
        let (s, hist) = get_json(&plain, &format!("{}/Patient/{id}/_history", c.sekmet()));
        assert_eq!(s, 200);
        if hist["total"] != 1 {
            twice.push(id.to_owned());
        }
    }
    assert!(twice.is_empty(), "written more than once upstream: {twice:?}\n{}", c.logs());
    println!(
        "FAULT|upstream FHIR link black-holed (relay swallowing bytes) mid-drain|ward writes: all 200 at once; agent: timeouts, {held} changes held|{PATIENTS} Patients|{PATIENTS} upstream, one version each|outbox empty, 0 parked"
    );
}
