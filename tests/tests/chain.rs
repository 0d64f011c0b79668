//! Chain anchoring against a real local chain: anvil (npm `@foundry-rs/anvil`, installed by
//! `scripts/setup-test-deps`) on a free loopback port. `hms-edge-agent chain deploy` deploys the
//! committed bytecode; the agent anchors checkpoints; `hms-edge verify --rpc` checks a FHIR version
//! and a DICOM instance on chain. The chain is stopped while the ward keeps writing, then comes
//! back: one catch-up anchor covers the outage, and earlier records verify through consistency
//! proofs. Finally every transaction's calldata and every log is scanned for PHI of the test data.

mod dicom_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dicom_common::*;
use hms_edge_tests::peers::{AgentProc, wait_until};
use hms_edge_tests::{DaemonOptions, DaemonProc, bin, fhir_client, free_port, write_secret};
use serde_json::{Value, json};

/// anvil's first development account (a public, well-known test key).
const DEV_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

/// The anvil binary itself (the npm package's platform binary, not its Node launcher: a signal
/// to the launcher would not reach the chain, and a killed launcher would leave it running).
fn anvil_bin() -> PathBuf {
    let p = std::env::var_os("HMS_ANVIL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(
            "/var/cache/hms-edge/anvil/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil",
        )
    });
    assert!(p.exists(), "{} missing: run scripts/setup-test-deps", p.display());
    p
}

struct Anvil {
    child: Child,
}

impl Anvil {
    fn start(port: u16, state: &Path) -> Anvil {
        let child = Command::new(anvil_bin())
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--silent", "--state"])
            .arg(state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start anvil");
        let a = Anvil { child };
        wait_until(Duration::from_secs(30), "anvil to answer", || {
            rpc_try(port, "eth_chainId", json!([])).ok()
        });
        a
    }

    /// SIGINT: anvil writes its state (`--state`) and exits.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "anvil did not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rpc_try(port: u16, method: &str, params: Value) -> Result<Value, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let v: Value = c
        .post(format!("http://127.0.0.1:{port}"))
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
        .send()
        .map_err(|e| e.to_string())?
        .json()
        .map_err(|e| e.to_string())?;
    if v.get("error").is_some() {
        return Err(v["error"].to_string());
    }
    Ok(v["result"].clone())
}

fn rpc(port: u16, method: &str, params: Value) -> Value {
    rpc_try(port, method, params).unwrap_or_else(|e| panic!("{method}: {e}"))
}

fn qty(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

fn anchored_logs(port: u16, contract: &str) -> Vec<Value> {
    rpc(
        port,
        "eth_getLogs",
        json!([{"fromBlock": "0x0", "toBlock": "latest", "address": contract}]),
    )
    .as_array()
    .unwrap()
    .clone()
}

fn log_size(l: &Value) -> u64 {
    let data = l["data"].as_str().unwrap().trim_start_matches("0x");
    u64::from_str_radix(&data[..64], 16).unwrap()
}

fn cli(state: &Path, args: &[&str]) -> (bool, String) {
    cli_env(state, args, &[])
}

fn cli_env(state: &Path, args: &[&str], env: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new(bin("hms-edge"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HMS_EDGE_PATHS_STATE_DIR", state);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    let t = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    (o.status.success(), t)
}

fn post_patient(c: &reqwest::blocking::Client, base: &str, family: &str, birth: &str) -> String {
    let p = json!({"resourceType": "Patient", "name": [{"family": family}], "birthDate": birth});
    let r = c
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .body(p.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned()
}

/// Waits until `$verify` at `url` answers with an anchor of at least `min_size` leaves.
fn wait_anchored(c: &reqwest::blocking::Client, url: &str, min_size: u64, what: &str) -> Value {
    wait_until(Duration::from_secs(180), what, || {
        let v: Value = c.get(url).send().ok()?.json().ok()?;
        (v["anchor"]["size"].as_u64()? >= min_size).then_some(v)
    })
}

#[test]
fn anchors_verify_on_chain_survive_an_outage_and_carry_no_phi() {
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let rpc_url = format!("http://127.0.0.1:{port}");
    let chain_state = work.path().join("anvil-state.json");
    let anvil = Anvil::start(port, &chain_state);

    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    opts.env.insert("HMS_EDGE_LEDGER_CHECKPOINT_INTERVAL_SECS".into(), "1".into());
    let d = DaemonProc::start(work.path(), &opts);
    let state = d.state_dir();
    let key = write_secret(work.path(), "chain-key", DEV_KEY);
    let mut env: Vec<(String, String)> = vec![
        ("HMS_EDGE_PATHS_STATE_DIR".into(), state.display().to_string()),
        ("HMS_EDGE_CHAIN_RPC_URL".into(), rpc_url.clone()),
        ("HMS_EDGE_CHAIN_KEY_FILE".into(), key.display().to_string()),
        ("HMS_EDGE_CHAIN_CONFIRMATIONS".into(), "1".into()),
        ("HMS_EDGE_CHAIN_ANCHOR_INTERVAL_SECS".into(), "10".into()),
    ];

    // Deploy the committed bytecode.
    let out = Command::new(bin("hms-edge-agent"))
        .args(["chain", "deploy"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    let deploy_text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "deploy: {deploy_text}");
    let contract = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(contract.starts_with("0x") && contract.len() == 42, "{contract}");
    env.push(("HMS_EDGE_CHAIN_CONTRACT".into(), contract.clone()));
    let agent = AgentProc::start(work.path(), &env);

    // Ward and modality write.
    let c = fhir_client(&state.join("tls/cert.pem"));
    let base = d.fhir_base();
    let (family, birth) = ("Chainsworth", "1957-03-09");
    let pid = post_patient(&c, &base, family, birth);
    let files = testfiles(&["CT_small.dcm"]);
    let facts = info(&files)[0].clone();
    let sop = facts["sop_instance"].as_str().unwrap().to_owned();
    let out = run(dcmtk("storescu")
        .args(["-aec", AE, "127.0.0.1", &d.dicom.port().to_string()])
        .arg(&files[0]));
    assert!(out.status.success(), "storescu: {}", String::from_utf8_lossy(&out.stderr));

    // Both get anchored; `hms-edge verify --rpc` checks the anchor on chain.
    let p1_url = format!("{base}/Patient/{pid}/_history/1/$verify");
    let proof = wait_anchored(&c, &p1_url, 1, "the FHIR version's anchor");
    let p1_file = work.path().join("p1.json");
    std::fs::write(&p1_file, proof.to_string()).unwrap();
    let (ok, t) = cli(&state, &["verify", "--rpc", &rpc_url, p1_file.to_str().unwrap()]);
    assert!(ok && t.contains("OK on chain"), "{t}");
    // The same over https:// (a chain's public RPC endpoint), its certificate checked against the
    // trusted CAs: refused while the CA is unknown, verified once SSL_CERT_FILE names it.
    let (https_url, rpc_ca) = tls_front(&rpc_url, work.path());
    let (ok, t) = cli(&state, &["verify", "--rpc", &https_url, p1_file.to_str().unwrap()]);
    assert!(!ok && t.contains("TLS"), "an untrusted RPC certificate must be refused: {t}");
    let (ok, t) = cli_env(
        &state,
        &["verify", "--rpc", &https_url, p1_file.to_str().unwrap()],
        &[("SSL_CERT_FILE", &rpc_ca)],
    );
    assert!(ok && t.contains("OK on chain"), "{t}");
    let dproof = wait_anchored(&c, &format!("{base}/$verify-dicom?sop={sop}"), 1, "DICOM anchor");
    let d_file = work.path().join("dicom.json");
    std::fs::write(&d_file, dproof.to_string()).unwrap();
    let (ok, t) = cli(&state, &["verify", "--rpc", &rpc_url, d_file.to_str().unwrap()]);
    assert!(ok && t.contains("OK on chain"), "{t}");
    // A proof whose anchor names another transaction fails on chain.
    let mut wrong = proof.clone();
    wrong["anchor"]["tx_hash"] = json!(format!("0x{}", "11".repeat(32)));
    let w_file = work.path().join("wrong.json");
    std::fs::write(&w_file, wrong.to_string()).unwrap();
    let (ok, t) = cli(&state, &["verify", "--rpc", &rpc_url, w_file.to_str().unwrap()]);
    assert!(!ok && t.contains("does NOT verify on chain"), "{t}");

    // The chain goes away; the ward keeps writing (offline is normal).
    let before = anchored_logs(port, &contract).len();
    anvil.stop();
    let mut outage_ids = Vec::new();
    for i in 0..5 {
        outage_ids.push(post_patient(&c, &base, &format!("Outage{i}"), "1970-01-01"));
        std::thread::sleep(Duration::from_millis(1500));
    }
    let outage_leaves = {
        let v: Value = c
            .get(format!("{base}/Patient/{}/_history/1/$verify", outage_ids[4]))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(v["anchor"], "pending", "anchored while the chain was down? {v}");
        v["tree_size"].as_u64().unwrap()
    };

    // The newest checkpoint signed while the chain was down: every checkpoint of the outage is at
    // most this size; checkpoints after the chain's return (the `$verify` reads above and below
    // are audited, so the log keeps growing) are larger and may be anchored normally.
    let signed_in_outage = checkpoint_size(d.admin);
    // It comes back (same state, same port): one catch-up anchor covers the whole outage.
    let anvil = Anvil::start(port, &chain_state);
    assert!(anchored_logs(port, &contract).len() >= before, "the chain kept its anchors");
    let last = wait_anchored(
        &c,
        &format!("{base}/Patient/{}/_history/1/$verify", outage_ids[4]),
        outage_leaves,
        "the catch-up anchor",
    );
    std::thread::sleep(Duration::from_secs(2));
    // (An anchor of the time before the outage may still arrive late: it was recorded before
    // the chain went down and is re-broadcast; it covers none of the outage's writes.)
    let logs = anchored_logs(port, &contract);
    let after: Vec<u64> =
        logs[before..].iter().map(log_size).filter(|s| *s >= outage_leaves).collect();
    let of_outage: Vec<u64> = after.iter().copied().filter(|s| *s <= signed_in_outage).collect();
    assert!(!after.is_empty(), "no anchor covers the outage");
    assert!(
        of_outage.len() <= 1,
        "one catch-up anchor, not one per missed checkpoint: {of_outage:?} (all after the outage: \
         {after:?}, newest checkpoint of the outage {signed_in_outage})"
    );
    let f = work.path().join("outage.json");
    std::fs::write(&f, last.to_string()).unwrap();
    let (ok, t) = cli(&state, &["verify", "--rpc", &rpc_url, f.to_str().unwrap()]);
    assert!(ok, "{t}");

    // Earlier records now verify against the newest anchor through a consistency proof; the
    // proof document fetched before the outage still verifies on chain as it was.
    let again: Value = c.get(&p1_url).send().unwrap().json().unwrap();
    assert!(again["anchor"]["size"].as_u64().unwrap() > again["tree_size"].as_u64().unwrap());
    assert!(!again["anchor"]["consistency"].as_array().unwrap().is_empty());
    let f = work.path().join("p1-again.json");
    std::fs::write(&f, again.to_string()).unwrap();
    let (ok, t) = cli(&state, &["verify", "--rpc", &rpc_url, f.to_str().unwrap()]);
    assert!(ok && t.contains("OK on chain"), "{t}");
    let (ok, t) = cli(&state, &["verify", "--rpc", &rpc_url, p1_file.to_str().unwrap()]);
    assert!(ok, "{t}");

    // No PHI on chain: every transaction's calldata and every log, as hex, against every
    // identifier, name and date of the test data.
    let mut phi: Vec<String> =
        vec![family.into(), birth.into(), pid.clone(), sop.clone(), "Outage".into()];
    for k in ["patient_name", "patient_id", "study", "series", "study_date"] {
        let v = facts[k].as_str().unwrap_or_default().to_owned();
        if v.len() >= 4 {
            phi.push(v);
        }
    }
    let head = qty(&rpc(port, "eth_blockNumber", json!([])));
    let mut blobs = Vec::new();
    let mut gas = Vec::new();
    for b in 0..=head {
        let block = rpc(port, "eth_getBlockByNumber", json!([format!("{b:#x}"), true]));
        for tx in block["transactions"].as_array().unwrap() {
            blobs.push(tx["input"].as_str().unwrap().to_owned());
            if tx["to"].as_str().map(str::to_ascii_lowercase) == Some(contract.to_ascii_lowercase())
            {
                let r = rpc(port, "eth_getTransactionReceipt", json!([tx["hash"]]));
                gas.push(qty(&r["gasUsed"]));
            }
        }
    }
    for l in anchored_logs(port, &contract) {
        blobs.push(l["data"].as_str().unwrap().to_owned());
        for t in l["topics"].as_array().unwrap() {
            blobs.push(t.as_str().unwrap().to_owned());
        }
    }
    for p in &phi {
        let needle = hex::encode(p.as_bytes());
        for b in &blobs {
            assert!(!b.to_ascii_lowercase().contains(&needle), "{p:?} found on chain in {b}");
        }
    }
    assert!(!gas.is_empty());
    println!(
        "chain: {} anchor transaction(s), gas used per anchor: {:?} (contract deploy: {})",
        gas.len(),
        gas,
        deploy_text.trim()
    );
    drop(agent);
    drop(anvil);
    d.stop();
}

/// `hms_ledger_checkpoint_size` from the daemon's /metrics: the newest signed checkpoint.
fn checkpoint_size(admin: std::net::SocketAddr) -> u64 {
    let (status, body) = hms_edge_tests::http_get(admin, "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("hms_ledger_checkpoint_size "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .expect("hms_ledger_checkpoint_size in /metrics")
}

/// A TLS front for the node, as a chain's public RPC endpoint would be: a certificate for
/// `localhost` from a CA of its own, one HTTP request per connection forwarded to `upstream`
/// (`http://127.0.0.1:port`). Returns the `https://` URL and the CA's PEM file.
fn tls_front(upstream: &str, dir: &Path) -> (String, PathBuf) {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let mut ca_p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_p.distinguished_name.push(rcgen::DnType::CommonName, "MediChain RPC test CA");
    let ca =
        rcgen::CertifiedIssuer::self_signed(ca_p, rcgen::KeyPair::generate().unwrap()).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let ca_file = dir.join("rpc-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = std::sync::Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = upstream.strip_prefix("http://").unwrap().to_owned();
    std::thread::spawn(move || {
        for tcp in listener.incoming().map_while(Result::ok) {
            let (cfg, upstream) = (cfg.clone(), upstream.clone());
            std::thread::spawn(move || {
                let mut tls =
                    rustls::StreamOwned::new(rustls::ServerConnection::new(cfg).unwrap(), tcp);
                let mut req = Vec::new();
                let mut chunk = [0u8; 8192];
                let mut want = None;
                while want.is_none_or(|w| req.len() < w) {
                    match tls.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&chunk[..n]),
                    }
                    if want.is_none()
                        && let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n")
                    {
                        let head = String::from_utf8_lossy(&req[..i]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        want = Some(i + 4 + len);
                    }
                }
                // One request per connection: ask the node to close after answering.
                let line_end = req.windows(2).position(|w| w == b"\r\n").unwrap();
                req.splice(line_end + 2..line_end + 2, b"Connection: close\r\n".iter().copied());
                let mut up = std::net::TcpStream::connect(&upstream).unwrap();
                up.write_all(&req).unwrap();
                let mut resp = Vec::new();
                let _ = up.read_to_end(&mut resp);
                let _ = tls.write_all(&resp);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    (format!("https://localhost:{port}"), ca_file)
}
