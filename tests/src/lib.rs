//! Test harness for the end-to-end tests: start the real `hms-edged` binary with a private state
//! folder, free loopback ports and a real `sd_notify` socket, and talk to it like systemd and
//! site IT would.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of a workspace binary (built by `scripts/test` before the tests run).
pub fn bin(name: &str) -> PathBuf {
    // current_exe: <target>/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let p = profile_dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which \
         scripts/test does)",
        p.display()
    );
    p
}

/// A loopback port that was free a moment ago, for a server a test starts (the daemon, a peer).
///
/// Taken at random below the kernel's ephemeral range (`ip_local_port_range`), not from it: a
/// port the kernel handed out for `:0` goes back to the pool the outgoing connections of the
/// tests running beside this one draw from, and one of them took it before the server bound it
/// ("Address already in use" in about one run in ten once the suite ran on release binaries).
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(20_000));
    for _ in 0..1000 {
        // RandomState is seeded afresh per call: a random number without a dependency.
        let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let port = low + (r % u64::from(high - low)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// A real `NOTIFY_SOCKET`: a Unix datagram socket that records what the daemon sends.
pub struct NotifySocket {
    pub path: PathBuf,
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    pub fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        NotifySocket { path, sock, seen: Vec::new() }
    }

    /// Waits until a received datagram contains `line` (e.g. `READY=1`); returns all messages
    /// seen so far. Panics after `timeout`.
    pub fn wait_for(&mut self, line: &str, timeout: Duration) -> &[String] {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if self.seen.iter().any(|m| m.lines().any(|l| l == line)) {
                return &self.seen;
            }
            assert!(Instant::now() < deadline, "no {line} within {timeout:?}; got {:?}", self.seen);
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    /// Forgets what was received (to wait for a second READY=1 after a reload).
    pub fn clear(&mut self) {
        self.seen.clear();
    }

    pub fn seen(&self) -> &[String] {
        &self.seen
    }
}

/// How to start the daemon under test.
#[derive(Debug, Default, Clone)]
pub struct DaemonOptions {
    /// Config file to pass with `--config`; none means embedded defaults.
    pub config: Option<PathBuf>,
    /// Extra environment (`HMS_EDGE_*` overrides, `WATCHDOG_USEC`, …).
    pub env: HashMap<String, String>,
    /// Set `HMS_EDGE_PATHS_STATE_DIR` to `<workdir>/state` (else the dev default in the cwd).
    pub explicit_state_dir: bool,
    /// A program (and its arguments) that runs the daemon, e.g. `fiu-run -x` for fault
    /// injection; it must exec the daemon so that the pid is the daemon's.
    pub wrapper: Vec<String>,
}

/// A running `hms-edged` with its captured stderr and notify socket.
pub struct DaemonProc {
    pub child: Child,
    pub workdir: PathBuf,
    pub admin: SocketAddr,
    pub fhir: SocketAddr,
    pub dicom: SocketAddr,
    pub dicom_tls: SocketAddr,
    pub notify: NotifySocket,
    log: Arc<Mutex<Vec<String>>>,
}

impl DaemonProc {
    /// Starts `hms-edged` in `workdir` (its cwd) on a free admin port. Does not wait for READY.
    pub fn spawn(workdir: &Path, opts: &DaemonOptions) -> DaemonProc {
        let notify_dir = tempfile::tempdir_in(workdir).unwrap().keep();
        let notify = NotifySocket::new(&notify_dir);
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let fhir: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dicom: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dicom_tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = match opts.wrapper.split_first() {
            None => Command::new(bin("hms-edged")),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("hms-edged"));
                c
            }
        };
        cmd.current_dir(workdir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("NOTIFY_SOCKET", &notify.path)
            .env("HMS_EDGE_LOG_TARGET", "stderr")
            .env("HMS_EDGE_ADMIN_LISTEN", admin.to_string())
            .env("HMS_EDGE_FHIR_LISTEN", fhir.to_string())
            .env("HMS_EDGE_DICOM_LISTEN", dicom.to_string())
            .env("HMS_EDGE_DICOM_TLS_LISTEN", dicom_tls.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if opts.explicit_state_dir {
            cmd.env("HMS_EDGE_PATHS_STATE_DIR", workdir.join("state"));
        }
        if let Some(c) = &opts.config {
            cmd.arg("--config").arg(c);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn hms-edged");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(strip_ansi(&line));
            }
        });
        DaemonProc {
            child,
            workdir: workdir.to_owned(),
            admin,
            fhir,
            dicom,
            dicom_tls,
            notify,
            log,
        }
    }

    /// Starts and waits for `READY=1`.
    pub fn start(workdir: &Path, opts: &DaemonOptions) -> DaemonProc {
        let mut d = DaemonProc::spawn(workdir, opts);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 4096];
        loop {
            if d.notify.seen.iter().any(|m| m.lines().any(|l| l == "READY=1")) {
                return d;
            }
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("hms-edged exited before READY ({status}); log:\n{}", d.log_text());
            }
            assert!(Instant::now() < deadline, "no READY=1 in 30 s; log:\n{}", d.log_text());
            if let Ok(n) = d.notify.sock.recv(&mut buf) {
                d.notify.seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains every one of `needles`.
    pub fn wait_log(&self, needles: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) =
                self.log.lock().unwrap().iter().find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Sends SIGTERM and waits for the exit: (status, every notify message, log).
    pub fn stop(mut self) -> (ExitStatus, Vec<String>, String) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = wait_timeout(&mut self.child, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.sock.recv(&mut buf) {
            self.notify.seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        (status, self.notify.seen.clone(), self.log_text())
    }

    /// Waits for the process to exit by itself (start-up failures).
    pub fn wait_exit(mut self) -> (ExitStatus, String) {
        let status = wait_timeout(&mut self.child, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
        (status, self.log_text())
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "process did not exit within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c2 in chars.by_ref() {
                if c2.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A plain HTTP/1.1 GET (no client library needed for the admin listener): (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, dechunk(&body))
}

/// Undoes `Transfer-Encoding: chunked` when present (axum streams some bodies).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size_line, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(size) = usize::from_str_radix(size_line.trim(), 16) else {
            return body.to_owned();
        };
        if size == 0 {
            return out;
        }
        if after.len() < size {
            return body.to_owned();
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

/// Writes a 0600 key file with 32 random bytes as hex; returns its path.
pub fn write_key_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let mut key = [0u8; 32];
    rand::fill(&mut key);
    let p = dir.join(name);
    std::fs::write(&p, hex_encode(&key)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

pub fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An HTTPS client for the daemon's FHIR listener that trusts exactly the daemon's generated
/// development CA (`ca.pem` beside the given certificate): real TLS, no verification switched off.
pub fn fhir_client(cert_pem: &Path) -> reqwest::blocking::Client {
    let cert_pem = &cert_pem.with_file_name("ca.pem");
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

impl DaemonProc {
    /// Base URL of the FHIR API (`https://localhost:<port>/fhir`).
    pub fn fhir_base(&self) -> String {
        format!("https://localhost:{}/fhir", self.fhir.port())
    }

    /// The state folder when started with `explicit_state_dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.workdir.join("state")
    }
}

/// Writes a secret file with mode 0600 (as site IT would) and returns its path.
pub fn write_secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(name);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    p
}

pub mod peers;

/// A TLS connection to the daemon's HTTPS listener at `addr`, trusting the development CA of
/// `state_dir` (real TLS, nothing switched off), for tests that write raw HTTP bytes.
pub fn raw_tls(
    state_dir: &Path,
    addr: SocketAddr,
    read_timeout: Duration,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(state_dir.join("tls/ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = Arc::new(
        rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth(),
    );
    let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(read_timeout)).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// A tmpfs mounted for one test (a small file system of its own: disk full, watermarks), lazily
/// unmounted when dropped. Needs root.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs `hms-edge audit check` on the (stopped) store in `state` and fails the test, with its
/// output, unless every record matches the integrity ledger.
pub fn assert_audit_check(state: &Path) {
    let out = Command::new(bin("hms-edge"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HMS_EDGE_PATHS_STATE_DIR", state)
        .args(["audit", "check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hms-edge audit check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
