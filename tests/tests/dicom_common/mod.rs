//! Shared harness of the DICOM end-to-end tests: the real DICOM server of hms-edged (library
//! entry point `hms_edge::dicom::serve`, on 127.0.0.1:0 with a fresh encrypted store), real peers
//! (DCMTK by absolute path — pynetdicom installs same-named scripts that shadow them on PATH —
//! and pynetdicom through `tests/dicom/peer.py`), and a raw PDU client for malformed input.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use hms_edge::config::DicomConfig;
use hms_edge::dicom::{DicomContext, export, index};
use hms_edge::keys::Key;
use hms_edge::store::{Store, StoreOptions};

pub const AE: &str = "HMS-EDGE";

/// A running DICOM server over its own store.
pub struct Scp {
    pub port: u16,
    pub tls_port: Option<u16>,
    pub store: Arc<Store>,
    pub ctx: Arc<DicomContext>,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scp {
    pub fn start() -> Scp {
        Self::start_with(DicomConfig::default(), None)
    }

    pub fn start_with(config: DicomConfig, tls: Option<Arc<rustls::ServerConfig>>) -> Scp {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::random();
        // The key also goes to a 0600 file so that `hms-edge` commands can open the same store.
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.path().join("master.key"))
                .unwrap();
            f.write_all(hex::encode(key.expose()).as_bytes()).unwrap();
        }
        let store =
            hms_edge::store::open(&dir.path().join("state"), &key, &StoreOptions::default())
                .unwrap();
        let ctx = DicomContext::new(store.clone(), &config);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let ctx2 = ctx.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let port = listener.local_addr().unwrap().port();
                let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                    let _ = rx.wait_for(|v| *v).await;
                };
                let plain =
                    hms_edge::dicom::serve(listener, ctx2.clone(), stopped(stop_rx.clone()));
                match tls {
                    None => {
                        port_tx.send((port, None)).unwrap();
                        plain.await.unwrap();
                    }
                    Some(cfg) => {
                        let tl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                        port_tx.send((port, Some(tl.local_addr().unwrap().port()))).unwrap();
                        let secure = hms_edge::dicom::serve_tls(tl, ctx2, cfg, stopped(stop_rx));
                        let (a, b) = tokio::join!(plain, secure);
                        a.unwrap();
                        b.unwrap();
                    }
                }
            });
        });
        let (port, tls_port) = port_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        Scp { port, tls_port, store, ctx, dir, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// (studies, series, instances) in the index.
    pub fn counts(&self) -> (u64, u64, u64) {
        self.store.read_blocking(index::counts).unwrap()
    }

    /// Blob files on disk (finished ones) and temp files.
    pub fn blob_files(&self) -> (usize, usize) {
        let root = self.store.blobs().root().to_owned();
        let tmp = std::fs::read_dir(root.join("tmp")).unwrap().count();
        let mut n = 0;
        for i in 0..=255u8 {
            n += std::fs::read_dir(root.join(format!("{i:02x}"))).unwrap().count();
        }
        (n, tmp)
    }

    /// Rows in the `blobs` table and DICOM changes in the `outbox` (a new study also adds a
    /// `study.received` event, which is not an instance change).
    pub fn rows(&self) -> (i64, i64) {
        self.store
            .read_blocking(|c| {
                Ok(c.query_row(
                    "SELECT (SELECT count(*) FROM blobs),
                            (SELECT count(*) FROM outbox WHERE kind = 'dicom')",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?)
            })
            .unwrap()
    }

    /// A config file for `hms-edge` naming this store and its key.
    pub fn cli_config(&self) -> PathBuf {
        let p = self.dir.path().join("edge.toml");
        let text = format!(
            "[paths]\nstate_dir = \"{}\"\n[keys]\nmaster_key_file = \"{}\"\ngenerate_if_missing = false\n",
            self.dir.path().join("state").display(),
            self.dir.path().join("master.key").display()
        );
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Exports an instance to a file in the test folder.
    pub fn export(&self, sop_uid: &str) -> PathBuf {
        let dest = self.dir.path().join(format!("export-{sop_uid}.dcm"));
        export::export_to_file(&self.store, sop_uid, None, &dest).unwrap();
        dest
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Scp {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A DCMTK tool by absolute path (pynetdicom's console scripts shadow the names on PATH).
pub fn dcmtk(tool: &str) -> Command {
    let p = Path::new("/usr/bin").join(tool);
    assert!(p.exists(), "{} missing: apt-get install dcmtk", p.display());
    Command::new(p)
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    if std::env::var_os("HMS_TEST_VERBOSE").is_some() {
        eprintln!(
            "{cmd:?}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dicom/peer.py")
}

/// Runs `peer.py` and parses its JSON output.
pub fn peer(args: &[&str]) -> serde_json::Value {
    let out = run(Command::new("python3").arg(peer_script()).args(args));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "peer.py {args:?}: {e}\nstdout: {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Paths of pydicom / pydicom-data test files.
pub fn testfiles(names: &[&str]) -> Vec<PathBuf> {
    let mut args = vec!["testfile"];
    args.extend_from_slice(names);
    let v = peer(&args);
    v.as_array()
        .unwrap()
        .iter()
        .zip(names)
        .map(|(p, n)| {
            PathBuf::from(
                p.as_str()
                    .unwrap_or_else(|| panic!("test file {n} not found: pip install pydicom-data")),
            )
        })
        .collect()
}

/// Instance facts of files (via pydicom).
pub fn info(files: &[PathBuf]) -> Vec<serde_json::Value> {
    let mut args = vec!["info".to_string()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    peer(&args).as_array().unwrap().clone()
}

// ---- a raw PDU client for malformed input -------------------------------------------------

/// A blocking TCP client speaking raw PDUs.
pub struct RawClient {
    pub sock: TcpStream,
}

pub const VERIFICATION: &str = "1.2.840.10008.1.1";
pub const CT_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

impl RawClient {
    pub fn connect(port: u16) -> RawClient {
        let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        RawClient { sock }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        // The server may already have aborted and closed: a failed write is not a test failure.
        let _ = self.sock.write_all(bytes);
    }

    /// Reads one PDU: (type, body). `None` when the server closed the connection.
    pub fn read_pdu(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 6];
        self.sock.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes(head[2..6].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        self.sock.read_exact(&mut body).ok()?;
        Some((head[0], body))
    }

    /// Associates with the given (abstract syntax, transfer syntax) contexts, ids 1, 3, 5, …
    pub fn associate(port: u16, calling: &str, contexts: &[(&str, &str)]) -> RawClient {
        let mut c = RawClient::connect(port);
        c.send(&associate_rq(calling, AE, contexts));
        let (ty, _) = c.read_pdu().expect("association answer");
        assert_eq!(ty, 0x02, "expected A-ASSOCIATE-AC");
        c
    }

    /// Sends one message part as P-DATA-TF PDUs.
    pub fn send_pdata(&mut self, context_id: u8, is_command: bool, data: &[u8], max: u32) {
        let mut out = Vec::new();
        hms_edge::dicom::pdu::encode_pdata(&mut out, context_id, is_command, data, max);
        self.send(&out);
    }

    /// Sends one data set fragment in one PDU, marked last or not.
    pub fn send_fragment(&mut self, context_id: u8, data: &[u8], last: bool) {
        let mut out = Vec::new();
        hms_edge::dicom::pdu::encode_pdata(&mut out, context_id, false, data, 0);
        assert_eq!(out.len(), data.len() + 12, "one PDV in one PDU");
        out[11] = if last { 2 } else { 0 };
        self.send(&out);
    }

    /// Reads P-DATA PDUs until a complete command arrives; returns it (data sets are skipped).
    pub fn read_command(&mut self) -> Option<hms_edge::dicom::dimse::Command> {
        let mut buf = Vec::new();
        loop {
            let (ty, body) = self.read_pdu()?;
            if ty != 0x04 {
                return None;
            }
            let mut rest = &body[..];
            while rest.len() >= 6 {
                let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                let control = rest[5];
                if control & 1 == 1 {
                    buf.extend_from_slice(&rest[6..4 + len]);
                    if control & 2 == 2 {
                        return Some(hms_edge::dicom::dimse::Command::decode(&buf).unwrap());
                    }
                }
                rest = &rest[4 + len..];
            }
        }
    }

    /// True when the server aborted (A-ABORT) or closed the connection.
    pub fn expect_abort(&mut self) -> bool {
        match self.read_pdu() {
            Some((0x07, _)) => true,
            None => true,
            Some((ty, _)) => panic!("expected A-ABORT, got PDU type {ty:#04x}"),
        }
    }
}

/// Encodes an A-ASSOCIATE-RQ with dicom-ul.
pub fn associate_rq(calling: &str, called: &str, contexts: &[(&str, &str)]) -> Vec<u8> {
    use dicom_ul::pdu::{AssociationRQ, Pdu, PresentationContextProposed, UserVariableItem};
    let rq = AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling.into(),
        called_ae_title: called.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: contexts
            .iter()
            .enumerate()
            .map(|(i, (a, t))| PresentationContextProposed {
                id: (2 * i + 1) as u8,
                abstract_syntax: (*a).into(),
                transfer_syntaxes: vec![(*t).into()],
            })
            .collect(),
        user_variables: vec![
            UserVariableItem::MaxLength(16384),
            UserVariableItem::ImplementationClassUID("1.2.3.4".into()),
        ],
    };
    hms_edge::dicom::pdu::encode(&Pdu::AssociationRQ(rq))
}

/// A C-STORE-RQ command set.
pub fn c_store_rq(message_id: u16, class: &str, instance: &str) -> Vec<u8> {
    use hms_edge::dicom::dimse::{Command, field, tag};
    let mut c = Command::new();
    c.set_u16(tag::COMMAND_FIELD, field::C_STORE_RQ)
        .set_u16(tag::MESSAGE_ID, message_id)
        .set_u16(tag::PRIORITY, 0)
        .set_u16(tag::COMMAND_DATA_SET_TYPE, 0)
        .set_uid(tag::AFFECTED_SOP_CLASS_UID, class)
        .set_uid(tag::AFFECTED_SOP_INSTANCE_UID, instance);
    c.encode()
}

/// The data set bytes (after File Meta) and transfer syntax of a Part 10 file.
pub fn dataset_of(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let off = hms_edge::dicom::dataset::part10_dataset_offset(&bytes).expect("Part 10 file");
    bytes[off..].to_vec()
}

/// Kills a helper process (reference SCP, …) when the test ends, even by panic.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One DCMTK storescu association over `files` (TCP_NODELAY, 10 s timeouts); returns the files it
/// got a Success response for, parsed from its verbose log.
pub fn storescu(port: u16, files: &[PathBuf]) -> Vec<PathBuf> {
    storescu_outcomes(port, files).0
}

/// [`storescu`], plus the response lines of the instances that were not stored.
pub fn storescu_outcomes(port: u16, files: &[PathBuf]) -> (Vec<PathBuf>, Vec<String>) {
    let out = run(dcmtk("storescu")
        .env("TCP_NODELAY", "1")
        .args(["-v", "-to", "10", "-ta", "10", "-td", "10", "-aec", AE, "127.0.0.1"])
        .arg(port.to_string())
        .args(files));
    let (mut acked, mut failed) = (Vec::new(), Vec::new());
    for stream in [&out.stdout, &out.stderr] {
        let mut current: Option<PathBuf> = None;
        for line in String::from_utf8_lossy(stream).lines() {
            if let Some(f) = line.strip_prefix("I: Sending file: ") {
                current = Some(PathBuf::from(f.trim()));
            } else if line.starts_with("I: Received Store Response (Success)") {
                acked.push(current.take().expect("a response names no file"));
            } else if line.starts_with("I: Received Store Response") {
                failed.push(line.to_owned());
                current = None;
            }
        }
    }
    (acked, failed)
}
