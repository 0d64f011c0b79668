//! The sync agent's real upstream peers (sekmet-fhir behind the emulated cloud gateway, Orthanc
//! with DICOMweb, mosquitto), started through `tests/peers/*.py` on free loopback ports, and the
//! agent process itself.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A peer launched by a Python script that prints one JSON line when ready.
pub struct Peer {
    pub child: Child,
    /// The ready line.
    pub info: Value,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers").join(name)
}

impl Peer {
    fn launch(mut cmd: Command, what: &str) -> Peer {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {} // keep the pipe drained
        });
        let line = rx
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|_| panic!("{what} did not become ready in 90 s"));
        let info: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{what} ready line {line:?}: {e}"));
        Peer { child, info }
    }

    /// Orthanc + DICOMweb.
    pub fn orthanc(workdir: &Path) -> Peer {
        let mut cmd = Command::new("python3");
        cmd.arg(script("start_peers.py")).arg("orthanc").arg("--workdir").arg(workdir);
        Self::launch(cmd, "orthanc")
    }

    /// mosquitto.
    pub fn mosquitto(workdir: &Path) -> Peer {
        let mut cmd = Command::new("python3");
        cmd.arg(script("start_peers.py")).arg("mosquitto").arg("--workdir").arg(workdir);
        Self::launch(cmd, "mosquitto")
    }

    /// The emulated cloud gateway with one sekmet-fhir per tenant and OAuth2 clients
    /// (`id:secret:tenant`).
    pub fn gateway(workdir: &Path, tenants: &[&str], clients: &[&str]) -> Peer {
        let mut cmd = Command::new("python3");
        cmd.arg(script("cloud_gateway.py"))
            .args(["--port", "0", "--control-port", "0", "--workdir"])
            .arg(workdir);
        for t in tenants {
            cmd.args(["--spawn-sekmet", t]);
        }
        for c in clients {
            cmd.args(["--client", c]);
        }
        Self::launch(cmd, "cloud gateway")
    }

    pub fn str(&self, key: &str) -> String {
        match &self.info[key] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("ready line has no {key}: {other}"),
        }
    }

    /// Gateway fault control (`POST /_control`).
    pub fn control(&self, body: Value) -> Value {
        let url = format!("http://127.0.0.1:{}/_control", self.str("control_port"));
        plain_client().post(url).json(&body).send().unwrap().json().unwrap()
    }

    /// Direct base URL of a tenant's sekmet instance (behind the gateway).
    pub fn sekmet_base(&self, tenant: &str) -> String {
        self.info["tenants"][tenant].as_str().unwrap().trim_end_matches('/').to_owned()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain-HTTP client for the loopback peers (installs the process's rustls provider first).
pub fn plain_client() -> reqwest::blocking::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// A running `hms-edge-agent` with its captured stderr.
pub struct AgentProc {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl AgentProc {
    /// Starts the agent in `workdir` with exactly `env` (plus PATH and stderr logging).
    pub fn start(workdir: &Path, env: &[(String, String)]) -> AgentProc {
        let mut cmd = Command::new(crate::bin("hms-edge-agent"));
        cmd.current_dir(workdir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HMS_EDGE_LOG_TARGET", "stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn hms-edge-agent");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("HMS_TEST_VERBOSE").is_some() {
                    eprintln!("agent: {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        AgentProc { child, log }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes (then panics with `what`).
pub fn wait_until<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    try_wait_until(timeout, f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `f` until it returns `Some`, or gives `None` after `timeout`.
pub fn try_wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
