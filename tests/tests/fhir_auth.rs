//! FHIR security with real tokens: ES256 JWTs signed by a key generated here, verified by the
//! daemon offline against a JWKS file; tenant and SMART scopes enforced; refusals audited.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use hms_edge::keys::Key;
use hms_edge::store::StoreOptions;
use hms_edge_tests::{DaemonOptions, DaemonProc, fhir_client};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::blocking::Client;
use serde_json::{Value, json};

const ISS: &str = "https://idp.cloud.example/realms/hms";
const AUD: &str = "hms-edge";
const TENANT: &str = "st-marys";

struct Idp {
    key: EncodingKey,
    jwk: Value,
}

fn idp(kid: &str) -> Idp {
    let kp = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256
    let raw = kp.public_key_raw(); // 0x04 || x || y
    assert_eq!(raw.len(), 65);
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
                     "kid": kid, "alg": "ES256", "use": "sig"});
    Idp { key: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(), jwk }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn token(idp: &Idp, kid: &str, claims: Value) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    encode(&h, &claims, &idp.key).unwrap()
}

fn claims(scope: &str) -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": "nurse-7", "exp": now() + 600, "iat": now(), "tenant": TENANT, "scope": scope})
}

struct Env {
    d: DaemonProc,
    c: Client,
    base: String,
    idp: Idp,
    _dir: tempfile::TempDir,
}

fn start() -> Env {
    start_with(|_| {})
}

fn start_with(extra: impl FnOnce(&mut DaemonOptions)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp("k1");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [idp.jwk]}).to_string()).unwrap();
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    for (k, v) in [
        ("HMS_EDGE_FHIR_AUTH", "jwt"),
        ("HMS_EDGE_FHIR_JWT_ISSUER", ISS),
        ("HMS_EDGE_FHIR_JWT_AUDIENCE", AUD),
        ("HMS_EDGE_SITE_TENANT_ID", TENANT),
    ] {
        opts.env.insert(k.into(), v.into());
    }
    opts.env.insert("HMS_EDGE_FHIR_JWKS_FILE".into(), jwks.display().to_string());
    extra(&mut opts);
    let d = DaemonProc::start(dir.path(), &opts);
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let base = d.fhir_base();
    Env { d, c, base, idp, _dir: dir }
}

fn status_of(r: reqwest::blocking::Response) -> (u16, Value) {
    let s = r.status().as_u16();
    let body = r.json().unwrap_or(Value::Null);
    (s, body)
}

#[test]
fn tokens_tenants_and_scopes_are_enforced_and_refusals_audited() {
    let e = start();
    let get = |path: &str, tok: Option<&str>| {
        let mut rb = e.c.get(format!("{}/{path}", e.base));
        if let Some(t) = tok {
            rb = rb.bearer_auth(t);
        }
        rb.send().unwrap()
    };
    let post = |path: &str, tok: &str, body: &Value| {
        e.c.post(format!("{}/{path}", e.base))
            .bearer_auth(tok)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .unwrap()
    };
    // The CapabilityStatement is public.
    assert_eq!(get("metadata", None).status(), 200);
    // No token.
    let r = get("Patient?family=x", None);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let (s, b) = status_of(r);
    assert_eq!((s, b["resourceType"].as_str()), (401, Some("OperationOutcome")));
    // Expired, wrong issuer, wrong audience, unknown signer, garbage.
    let mut c = claims("user/*.cruds");
    c["exp"] = json!(now() - 3600);
    assert_eq!(get("Patient", Some(&token(&e.idp, "k1", c))).status(), 401);
    let mut c = claims("user/*.cruds");
    c["iss"] = json!("https://evil.example");
    assert_eq!(get("Patient", Some(&token(&e.idp, "k1", c))).status(), 401);
    let mut c = claims("user/*.cruds");
    c["aud"] = json!("another-app");
    assert_eq!(get("Patient", Some(&token(&e.idp, "k1", c))).status(), 401);
    let other = idp("k1");
    assert_eq!(get("Patient", Some(&token(&other, "k1", claims("user/*.cruds")))).status(), 401);
    assert_eq!(get("Patient", Some("not.a.jwt")).status(), 401);
    // A valid token of another tenant.
    let mut c = claims("user/*.cruds");
    c["tenant"] = json!("other-hospital");
    let (s, b) = status_of(get("Patient", Some(&token(&e.idp, "k1", c))));
    assert_eq!(s, 403);
    assert!(b.to_string().contains("other-hospital"), "{b}");

    // Scopes: a reader may read and search patients, nothing else.
    let writer = token(&e.idp, "k1", claims("user/*.cruds"));
    let reader = token(&e.idp, "k1", claims("user/Patient.rs"));
    let p = json!({"resourceType": "Patient", "name": [{"family": "Scoped"}]});
    let r = post("Patient", &writer, &p);
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(get(&format!("Patient/{id}"), Some(&reader)).status(), 200);
    assert_eq!(get("Patient?family=scoped", Some(&reader)).status(), 200);
    let (s, b) = status_of(post("Patient", &reader, &p));
    assert_eq!((s, b["resourceType"].as_str()), (403, Some("OperationOutcome")));
    assert_eq!(get("Observation?code=x", Some(&reader)).status(), 403);
    // A transaction with one entry outside the scopes is refused whole.
    let limited = token(&e.idp, "k1", claims("user/Patient.cruds"));
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "name": [{"family": "TxOk"}]}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}, "request": {"method": "POST", "url": "Observation"}}]});
    assert_eq!(post("", &limited, &tx).status(), 403);
    let b: Value = get("Patient?family=txok", Some(&reader)).json().unwrap();
    assert_eq!(b["total"], 0, "nothing of a refused transaction may be stored");
    // $everything leaves out what the caller may not read.
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{id}")}});
    assert_eq!(post("Observation", &writer, &obs).status(), 201);
    let all: Value = get(&format!("Patient/{id}/$everything"), Some(&writer)).json().unwrap();
    assert_eq!(all["entry"].as_array().unwrap().len(), 2);
    let mine: Value = get(&format!("Patient/{id}/$everything"), Some(&reader)).json().unwrap();
    assert_eq!(mine["entry"].as_array().unwrap().len(), 1);

    // Refusals are in the audit log with who and from where.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let state = e.d.state_dir();
    let (status, _, log) = e.d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains(&writer), "tokens must never be logged");
    let key = hms_edge::keys::load_key_file(&state.join("master.key")).unwrap();
    let store =
        hms_edge::store::open(&state, &Key::from_bytes(*key.expose()), &StoreOptions::default())
            .unwrap();
    let rows: Vec<(String, String, String)> = store
        .read_blocking(|c| {
            let mut s = c.prepare("SELECT action, actor, outcome FROM audit_events")?;
            let rows = s
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
        .unwrap();
    assert!(
        rows.iter().filter(|r| r.0 == "authenticate" && r.2.starts_with("401")).count() >= 6,
        "{rows:?}"
    );
    assert!(rows.iter().any(|r| r.0 == "authenticate" && r.2.starts_with("403")), "{rows:?}");
    assert!(
        rows.iter().any(|r| r.0 == "authorize" && r.1 == "nurse-7" && r.2 == "403"),
        "{rows:?}"
    );
    assert!(rows.iter().any(|r| r.0 == "create" && r.1 == "nurse-7"), "{rows:?}");
}

#[test]
fn auth_off_is_refused_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    opts.env.insert("HMS_EDGE_FHIR_LISTEN".into(), "0.0.0.0:0".into());
    let (status, log) = DaemonProc::spawn(dir.path(), &opts).wait_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("fhir.auth"), "{log}");
}

/// A CA as a site would run one for its workstations, and client certificates it issues.
struct WorkstationCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl WorkstationCa {
    fn new(name: &str) -> Self {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let issuer =
            rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap();
        WorkstationCa { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// An HTTPS client presenting a certificate with subject CN `cn` issued by this CA.
    fn client(&self, cn: &str, server_ca: &std::path::Path) -> Client {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(server_ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        Client::builder().use_preconfigured_tls(tls).build().unwrap()
    }
}

/// Fixed workstations with client certificates (mTLS): a listed CN gets exactly its configured
/// scopes, an unlisted CN or no certificate needs a token, a certificate from another CA does not
/// get through the handshake, a token takes precedence, and the audit trail names the certificate.
#[test]
fn workstation_client_certificates() {
    let site_ca = WorkstationCa::new("St Mary's workstation CA");
    let rogue_ca = WorkstationCa::new("St Mary's workstation CA");
    let cfg_dir = tempfile::tempdir().unwrap();
    let ca_file = cfg_dir.path().join("workstation-ca.pem");
    std::fs::write(&ca_file, site_ca.pem()).unwrap();
    let config = cfg_dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[fhir]\nclient_ca_file = {:?}\n\n[fhir.client_certs]\n\"ward3-ws1\" = \"user/Patient.rs\"\n",
            ca_file.display().to_string()
        ),
    )
    .unwrap();
    let e = start_with(|o| o.config = Some(config.clone()));
    let server_ca = e.d.state_dir().join("tls/ca.pem");
    let writer = token(&e.idp, "k1", claims("user/*.cruds"));
    let p = json!({"resourceType": "Patient", "name": [{"family": "Ward3"}]});
    let r =
        e.c.post(format!("{}/Patient", e.base))
            .bearer_auth(&writer)
            .header("content-type", "application/fhir+json")
            .body(p.to_string())
            .send()
            .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();

    // The listed workstation reads patients without a token, and nothing more.
    let ws = site_ca.client("ward3-ws1", &server_ca);
    let (s, b) = status_of(ws.get(format!("{}/Patient/{id}", e.base)).send().unwrap());
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["name"][0]["family"], "Ward3");
    assert_eq!(ws.get(format!("{}/Patient?family=ward3", e.base)).send().unwrap().status(), 200);
    let r = ws
        .post(format!("{}/Patient", e.base))
        .header("content-type", "application/fhir+json")
        .body(p.to_string())
        .send()
        .unwrap();
    let (s, b) = status_of(r);
    assert_eq!((s, b["resourceType"].as_str()), (403, Some("OperationOutcome")));
    assert_eq!(ws.get(format!("{}/Observation?code=x", e.base)).send().unwrap().status(), 403);
    // With a token the token decides (here: may write).
    let r = ws
        .post(format!("{}/Patient", e.base))
        .bearer_auth(&writer)
        .header("content-type", "application/fhir+json")
        .body(p.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);

    // A certificate of the site CA whose CN is not listed is no identity.
    let stranger = site_ca.client("ward9-ws4", &server_ca);
    let r = stranger.get(format!("{}/Patient/{id}", e.base)).send().unwrap();
    assert_eq!(r.status(), 401);
    // A certificate for the listed CN from another CA fails the handshake.
    let forged = rogue_ca.client("ward3-ws1", &server_ca);
    assert!(forged.get(format!("{}/Patient/{id}", e.base)).send().is_err());
    // Callers without a certificate are unaffected.
    assert_eq!(e.c.get(format!("{}/Patient/{id}", e.base)).send().unwrap().status(), 401);
    assert_eq!(
        e.c.get(format!("{}/Patient/{id}", e.base)).bearer_auth(&writer).send().unwrap().status(),
        200
    );

    // The audit trail names the workstation.
    let auditor = token(&e.idp, "k1", claims("user/AuditEvent.rs"));
    let mut found = Vec::new();
    for _ in 0..50 {
        let (s, b) = status_of(
            e.c.get(format!("{}/AuditEvent?agent-name=cert:ward3-ws1&subtype=read", e.base))
                .bearer_auth(&auditor)
                .send()
                .unwrap(),
        );
        assert_eq!(s, 200, "{b}");
        found = b["entry"].as_array().cloned().unwrap_or_default();
        if !found.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["resource"]["agent"][0]["who"]["display"], "cert:ward3-ws1");
}

/// The issuer rotates its signing key: the agent writes the new JWKS to disk and tokens signed
/// with the new key are accepted without a restart; after SIGHUP with the old key removed, the
/// old key's tokens are refused. A broken file keeps the keys in use.
#[test]
fn jwks_on_disk_is_followed_without_restart() {
    let e = start();
    let jwks = e.d.workdir.join("jwks.json");
    let new_idp = idp("k2");
    let old_tok = token(&e.idp, "k1", claims("user/*.cruds"));
    let new_tok = token(&new_idp, "k2", claims("user/*.cruds"));
    let get = |tok: &str| {
        e.c.get(format!("{}/Patient?_count=1", e.base)).bearer_auth(tok).send().unwrap().status()
    };
    assert_eq!(get(&old_tok), 200);
    assert_eq!(get(&new_tok), 401, "k2 is not published yet");
    // The agent publishes both keys (write + rename, as it does).
    let write = |v: Value| {
        let tmp = jwks.with_extension("tmp");
        std::fs::write(&tmp, v.to_string()).unwrap();
        std::fs::rename(&tmp, &jwks).unwrap();
    };
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write(json!({"keys": [e.idp.jwk, new_idp.jwk]}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while get(&new_tok) != 200 {
        assert!(std::time::Instant::now() < deadline, "k2 never accepted");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(get(&old_tok), 200);
    // A broken file is refused; the keys in use stay.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write(json!({"keys": "nope"}));
    e.d.signal(nix::sys::signal::Signal::SIGHUP);
    e.d.wait_log(&["JWKS reload refused"], std::time::Duration::from_secs(10));
    assert_eq!(get(&new_tok), 200);
    // k1 retired: after SIGHUP its tokens are refused at once.
    write(json!({"keys": [new_idp.jwk]}));
    e.d.signal(nix::sys::signal::Signal::SIGHUP);
    e.d.wait_log(&["JWKS re-read"], std::time::Duration::from_secs(10));
    assert_eq!(get(&old_tok), 401);
    assert_eq!(get(&new_tok), 200);
}

/// Issue 16: a token not valid yet (`nbf`), a SMART v2 granular scope and a create-only token
/// with `If-None-Exist` are each held to what they grant; an unauthenticated create is refused
/// before its body is read.
#[test]
fn tokens_are_held_to_exactly_what_they_grant() {
    let e = start();
    let all = token(&e.idp, "k1", claims("user/*.cruds"));
    let post = |tok: &str, body: &Value, if_none_exist: Option<&str>| {
        let mut rb =
            e.c.post(format!("{}/Patient", e.base))
                .bearer_auth(tok)
                .header("content-type", "application/fhir+json")
                .body(body.to_string());
        if let Some(c) = if_none_exist {
            rb = rb.header("if-none-exist", c);
        }
        rb.send().unwrap()
    };
    let patient = json!({"resourceType": "Patient",
        "identifier": [{"system": "urn:mrn", "value": "NBF-1"}], "name": [{"family": "Nbf"}]});
    assert_eq!(post(&all, &patient, None).status(), 201);

    // `nbf` an hour ahead: not valid yet.
    let mut c = claims("user/*.cruds");
    c["nbf"] = json!(now() + 3600);
    let (s, b) = status_of(post(&token(&e.idp, "k1", c), &patient, None));
    assert_eq!(s, 401, "{b}");

    // A granular scope is not widened to the whole type: no Observation search at all.
    let granular = token(&e.idp, "k1", claims("user/Observation.rs?category=laboratory"));
    let r = e.c.get(format!("{}/Observation", e.base)).bearer_auth(&granular).send().unwrap();
    assert_eq!(r.status(), 403);

    // A create-only token may not learn, through If-None-Exist, what exists.
    let create_only = token(&e.idp, "k1", claims("user/Patient.c"));
    let (s, _) = status_of(post(&create_only, &patient, Some("identifier=urn:mrn|NBF-1")));
    assert_eq!(s, 403);
    // With search but no read: the match is reported (200, Location) without the resource.
    let create_search = token(&e.idp, "k1", claims("user/Patient.cs"));
    let r = post(&create_search, &patient, Some("identifier=urn:mrn|NBF-1"));
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("location"));
    assert!(r.bytes().unwrap().is_empty(), "the existing Patient leaked to a token without read");
    // With read: the existing resource comes back.
    let r = post(&all, &patient, Some("identifier=urn:mrn|NBF-1"));
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["name"][0]["family"], "Nbf");

    // No token and a body announced as 50 MB that never comes: refused at once (the body is
    // not waited for), and the daemon still serves.
    let answer = raw_request(
        &e,
        "POST /fhir/Patient HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\n\
         Content-Length: 50000000\r\n\r\n{",
    );
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let (s, _) =
        status_of(e.c.get(format!("{}/Patient", e.base)).bearer_auth(&all).send().unwrap());
    assert_eq!(s, 200);
}

/// Sends `head` over TLS and returns the response head (what arrived within 20 s).
fn raw_request(e: &Env, head: &str) -> String {
    use std::io::{Read, Write};
    let mut tls =
        hms_edge_tests::raw_tls(&e.d.state_dir(), e.d.fhir, std::time::Duration::from_secs(20));
    tls.write_all(head.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}
