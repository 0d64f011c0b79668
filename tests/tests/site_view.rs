//! The site IT view of a running box. The real `hms-edged` receives instances from DCMTK
//! `storescu`, a resource over FHIR and an agent report over the internal API socket; then
//! - the status page on the admin listener is looked at by headless Chromium (Debian `chromium`,
//!   installed by `scripts/setup-test-deps`), which dumps its DOM and takes a screenshot that is
//!   decoded and checked for its size and for not being blank;
//! - the Grafana dashboard `packaging/grafana/hms-edge.json` is parsed and every metric name its
//!   queries use is looked up in the live `/metrics` output, so the dashboard cannot drift.

mod dicom_common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dicom_common::*;
use hms_edge::sync::client::InternalClient;
use hms_edge_tests::{DaemonOptions, DaemonProc, fhir_client, http_get};
use serde_json::json;

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 900;

fn chromium_path() -> PathBuf {
    let p = PathBuf::from("/usr/bin/chromium");
    assert!(
        p.exists(),
        "{} missing: scripts/setup-test-deps installs Debian's chromium",
        p.display()
    );
    p
}

/// Runs headless Chromium with `args` on `url`; returns its stdout. Killed after 90 s.
fn chromium(profile: &Path, args: &[String], url: &str) -> String {
    let mut cmd = Command::new(chromium_path());
    cmd.args(["--headless", "--disable-gpu", "--no-first-run", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--disable-dev-shm-usage", "--disable-extensions", "--mute-audio"]);
    // Chromium refuses to start as root with its sandbox on ("Running as root without
    // --no-sandbox is not supported"); CI and the dev machines run the tests as root.
    if nix::unistd::geteuid().is_root() {
        cmd.arg("--no-sandbox");
    }
    let mut child = cmd
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chromium");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in 90 s: {}", err.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(status.success(), "chromium {args:?}: {status}\n{err}");
    out
}

/// A GET with a Host header of our choosing (a DNS-rebinding browser sends its own name).
fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Text of the element with `id` in a DOM dump (the page's markup is ours: no nesting there).
fn element_text(dom: &str, id: &str) -> String {
    let start = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id} in\n{dom}"));
    let rest = &dom[start..];
    let open = rest.find('>').unwrap() + 1;
    let close = rest[open..].find('<').unwrap() + open;
    rest[open..close].to_string()
}

/// What a box sees on a normal morning: two instances of two studies from a modality, an
/// Observation from a ward, and the agent's report that the FHIR link is up. Returns the
/// instances' facts (pydicom).
fn populate(d: &DaemonProc) -> Vec<serde_json::Value> {
    // Two instances of two studies from a modality.
    let files = testfiles(&["CT_small.dcm", "MR_small.dcm"]);
    let facts = info(&files);
    assert_ne!(facts[0]["study"], facts[1]["study"]);
    let port = d.dicom.port().to_string();
    for f in &files {
        let out = run(dcmtk("storescu").args(["-R", "-aec", AE, "127.0.0.1", &port]).arg(f));
        assert!(out.status.success(), "storescu: {}", String::from_utf8_lossy(&out.stderr));
    }
    // One resource from a ward workstation (a type the DICOM side never writes).
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let obs = json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "heart rate"}, "valueQuantity": {"value": 72, "unit": "/min"}});
    let r = c
        .post(format!("{}/Observation", d.fhir_base()))
        .header("content-type", "application/fhir+json")
        .body(obs.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    // hms-edge-agent's report on its FHIR channel, through the internal API as the agent does.
    let report = json!({"link": "up", "last_success_ms": now_ms() - 5_000, "last_error": null,
        "sent": 3, "received": 0, "bytes_sent": 2048, "conflicts": 0, "parked": 0, "rejected": 0});
    let client = InternalClient::new(d.state_dir().join("agent.sock"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(client.put_state("status.fhir", &report)).unwrap();
    facts
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[test]
fn status_page_shows_todays_counts_in_headless_chromium() {
    let work = tempfile::tempdir().unwrap();
    let d = DaemonProc::start(
        work.path(),
        &DaemonOptions { explicit_state_dir: true, ..Default::default() },
    );
    let facts = populate(&d);

    // Plain HTTP first: the page, its headers' promise (no external assets), both paths.
    let (status, body) = http_get(d.admin, "/status");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(">2 studies<"), "{body}");
    assert_eq!(http_get(d.admin, "/").0, 200);
    assert_eq!(get_with_host(d.admin, "/status", "evil.example:9464"), 421);
    assert_eq!(get_with_host(d.admin, "/metrics", &d.admin.to_string()), 200);
    for needle in ["<script", "src=", "href=", "url("] {
        assert!(!body.contains(needle), "{needle} on the page");
    }
    // Counts only: no patient name or id from the stored instances.
    for f in &facts {
        for k in ["patient_name", "patient_id"] {
            let v = f[k].as_str().unwrap();
            if v.len() > 3 {
                assert!(!body.contains(v), "{k} {v} on the status page");
            }
        }
    }

    let url = format!("http://{}/status", d.admin);
    let profile = tempfile::tempdir().unwrap();

    // The DOM as Chromium built it.
    let dom = chromium(profile.path(), &["--dump-dom".into()], &url);
    assert!(dom.contains("<title>hms-edge status: "), "{dom}");
    assert_eq!(element_text(&dom, "studies-today"), "2 studies");
    assert_eq!(element_text(&dom, "instances-today"), "2 instances received over DICOM");
    let obs_row = dom.find("data-type=\"Observation\">").expect("Observation row");
    assert!(dom[obs_row..].starts_with("data-type=\"Observation\">1<"), "{dom}");
    assert_eq!(element_text(&dom, "store-state"), "open");
    assert!(element_text(&dom, "blobs").starts_with("2 files, "), "{dom}");
    assert_eq!(element_text(&dom, "parked"), "0 parked changes");
    assert_eq!(element_text(&dom, "conflicts"), "0 open conflicts");
    assert!(dom.contains(">link up</span>"), "{dom}");
    // The DICOM channel holds the two instances (and their study events) for the agent.
    assert!(dom.contains("id=\"queue-dicom\""), "{dom}");
    let dicom_row = &dom[dom.find("id=\"queue-dicom\"").unwrap()..];
    let pending: u64 = dicom_row
        .split("<td class=\"n\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .and_then(|s| s.parse().ok())
        .expect("dicom pending cell");
    assert!(pending >= 2, "dicom queue {pending}: {dicom_row}");

    // A screenshot at a set window size: a PNG of that size, and not blank.
    let shot = work.path().join("status.png");
    chromium(
        profile.path(),
        &[format!("--screenshot={}", shot.display()), format!("--window-size={WIDTH},{HEIGHT}")],
        &url,
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    assert_eq!((frame.width, frame.height), (WIDTH, HEIGHT), "screenshot size");
    let channels = frame.color_type.samples();
    assert!(channels >= 3, "colour screenshot expected: {:?}", frame.color_type);
    assert_eq!(frame.bit_depth, png::BitDepth::Eight);
    let pixels: Vec<[u8; 3]> =
        buf[..frame.buffer_size()].chunks(channels).map(|p| [p[0], p[1], p[2]]).collect();
    // Luminance variance over the whole picture: a blank (or error) page is one flat colour.
    let lum: Vec<f64> = pixels
        .iter()
        .map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64)
        .collect();
    let mean = lum.iter().sum::<f64>() / lum.len() as f64;
    let var = lum.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / lum.len() as f64;
    let mut distinct: Vec<[u8; 3]> = pixels.clone();
    distinct.sort_unstable();
    distinct.dedup();
    eprintln!(
        "status page screenshot {}: {WIDTH}x{HEIGHT}, luminance mean {mean:.1}, variance \
         {var:.1}, {} distinct colours",
        shot.display(),
        distinct.len()
    );
    assert!(var > 100.0, "screenshot looks blank (luminance variance {var:.1})");
    assert!(distinct.len() > 50, "screenshot has only {} colours", distinct.len());
    // The inline CSS was applied: the header band (#17324d) fills the top rows.
    let header = pixels[(10 * WIDTH + WIDTH / 2) as usize];
    assert!(
        header[0] < 60 && header[1] < 80 && header[2] > 50 && header[2] < 120,
        "header pixel {header:?} is not the page's dark blue"
    );
    if let Ok(dir) = std::env::var("HMS_TEST_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, Path::new(&dir).join("status-page.png")).unwrap();
    }

    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Metric names of the Prometheus text format: `name{labels} value` or `name value`.
fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every `hms_*` name in the dashboard's queries.
fn dashboard_names(dashboard: &serde_json::Value) -> std::collections::BTreeSet<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "only {} queries in the dashboard", exprs.len());
    let mut names = std::collections::BTreeSet::new();
    for e in exprs {
        let bytes = e.as_bytes();
        let mut i = 0;
        while let Some(pos) = e[i..].find("hms_") {
            let start = i + pos;
            let boundary = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = e[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(e.len(), |n| start + n);
            if boundary {
                names.insert(e[start..end].to_owned());
            }
            i = end;
        }
    }
    names
}

#[test]
fn grafana_dashboard_uses_only_exported_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/hms-edge.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Importable: a title, a uid, a Prometheus data source input, panels with unique ids.
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["uid"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus", "{}", dashboard["__inputs"]);
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids: Vec<i64> = panels.iter().map(|p| p["id"].as_i64().expect("panel id")).collect();
    ids.sort_unstable();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate panel ids");
    let used = dashboard_names(&dashboard);

    let work = tempfile::tempdir().unwrap();
    let d = DaemonProc::start(
        work.path(),
        &DaemonOptions { explicit_state_dir: true, ..Default::default() },
    );
    populate(&d);
    let (status, metrics) = http_get(d.admin, "/metrics");
    assert_eq!(status, 200);
    let exported = exported_names(&metrics);
    let missing: Vec<&String> = used.difference(&exported).collect();
    eprintln!("dashboard uses {} metric names, /metrics exports {}", used.len(), exported.len());
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics that /metrics does not export: {missing:?}\nexported: \
         {exported:?}"
    );
    // The areas the dashboard is for are all there.
    for needle in [
        "hms_dicom_store_total",
        "hms_store_commit_seconds",
        "hms_store_commits_total",
        "hms_fhir_requests_total",
        "hms_sync_queue_pending",
        "hms_sync_oldest_unsynced_seconds",
        "hms_sync_parked",
        "hms_sync_open_conflicts",
        "hms_disk_free_bytes",
    ] {
        assert!(used.iter().any(|u| u.starts_with(needle)), "dashboard has no {needle} panel");
    }
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
}
