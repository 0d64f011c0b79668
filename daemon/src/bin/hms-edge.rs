//! `hms-edge`: the site IT admin's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hms_edge::config;
use hms_edge::sync::api::{Affected, Conflict, ParkedChange, ResolveRequest, StatusResponse};
use hms_edge::sync::client::{ClientError, InternalClient};

#[derive(Debug, Parser)]
#[command(version, about = "Administer an hms-edge box")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the embedded
    /// defaults), print the effective configuration with secrets redacted; non-zero exit on error.
    CheckConfig {
        /// The file to check.
        file: Option<PathBuf>,
    },
    /// Sync state as hms-edged knows it: per channel queue depth, age of the oldest unsynced
    /// change, parked changes, and what the agent last reported (link, last success, bytes sent).
    Status {
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Upstream sync: conflicts and parked changes.
    Sync {
        #[command(subcommand)]
        command: SyncCommand,
        /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// Check an integrity proof document (from `$verify`) offline: the checkpoint's Ed25519
    /// signature, the leaf, and its inclusion path up to the signed root. Exit 0 when it holds.
    Verify {
        /// The proof document (JSON file; `-` for standard input).
        proof: PathBuf,
        /// Pin the log's verifier key (`hms-edge audit key` prints it) instead of trusting the
        /// key named in the document.
        #[arg(long)]
        key: Option<String>,
        /// Also check the anchor on chain through this Ethereum JSON-RPC URL.
        #[arg(long)]
        rpc: Option<String>,
    },
    /// The integrity ledger's audit tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
        /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// DICOM tools.
    Dicom {
        #[command(subcommand)]
        command: DicomCommand,
    },
    /// Back up the store into the new folder DEST while hms-edged runs: a consistent snapshot of
    /// the (still encrypted) database, the encrypted blob files it references, and a manifest of
    /// SHA-256 checksums. The master key is NOT in the backup: keep it separately.
    Backup {
        /// Destination folder (must not exist; created complete or not at all).
        dest: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Replace the store by a backup. hms-edged must be stopped. Checks the manifest's key
    /// fingerprint and every checksum before anything changes; the swap is atomic.
    Restore {
        /// The backup folder (made by `hms-edge backup`).
        src: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Give the store a new master key: the database is re-keyed, the blob and audit keys are
    /// re-wrapped, everything is verified under the new key, then the old key is destroyed.
    /// hms-edged must be stopped. Re-run it after an interruption: it finishes or undoes.
    RotateKey {
        #[command(flatten)]
        key: KeyArgs,
    },
}

/// Where the config and the master key are.
#[derive(Debug, clap::Args)]
struct KeyArgs {
    /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The master key file (default: `keys.master_key_file`, else $CREDENTIALS_DIRECTORY/master-key,
    /// else <state_dir>/master.key if present, else the packaged key:
    /// /etc/hms-edge/credstore.encrypted/master-key (via systemd-creds) or /etc/hms-edge/master-key).
    #[arg(long, conflicts_with = "credential")]
    key_file: Option<PathBuf>,
    /// The master key as a systemd encrypted credential (read and written with systemd-creds).
    #[arg(long)]
    credential: Option<PathBuf>,
}

/// The packaged encrypted credential and fallback key file (see packaging/package-setup).
const PACKAGED_CREDENTIAL: &str = "/etc/hms-edge/credstore.encrypted/master-key";
const PACKAGED_KEY_FILE: &str = "/etc/hms-edge/master-key";

#[derive(Debug, Subcommand)]
enum DicomCommand {
    /// Write a stored instance as a DICOM Part 10 file: the File Meta Information of hms-edged
    /// followed by the data set exactly as it was received. Safe while hms-edged runs.
    Export {
        /// SOP Instance UID of the instance.
        sop_instance_uid: String,
        /// Destination file (written atomically).
        file: PathBuf,
        /// A given version (with `duplicate_policy = "keep-both"`); default: the newest.
        #[arg(long)]
        version: Option<i64>,
        /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute the integrity log from the stored records (read-only; needs the master key)
    /// and compare it with the stored leaves and every signed checkpoint. Lists each modified,
    /// deleted, moved or unlogged record by name and log position; exit 1 if any.
    Check,
    /// Write the audit trail as FHIR AuditEvent resources (IHE BALP style), one JSON object per
    /// line (NDJSON), oldest first. The export itself is recorded as an audit event.
    Export {
        /// Only events recorded at or after this FHIR date/dateTime (e.g. 2026-11-01).
        #[arg(long)]
        since: Option<String>,
        /// Write to this file (created 0600) instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Print the log's checkpoint verifier key (public; give it to auditors for `verify --key`).
    Key,
}

#[derive(Debug, Subcommand)]
enum SyncCommand {
    /// List conflicts between edge and upstream changes (newest first).
    Conflicts {
        /// Only the ones waiting for a decision (policy "manual").
        #[arg(long)]
        open: bool,
    },
    /// Decide a held conflict: keep the edge's version (pushed over upstream's) or upstream's.
    Resolve {
        id: i64,
        #[arg(long, value_parser = ["local", "upstream"])]
        keep: String,
    },
    /// List changes parked after upstream refused them, with upstream's reason.
    Parked,
    /// Put parked changes back in the queue (all, or the given sequence numbers).
    Retry { seqs: Vec<i64> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Status { json, config: cfg } => internal(cfg, |c| async move {
            let s: StatusResponse = c.get("/v1/status").await?;
            if json {
                return Ok(serde_json::to_string_pretty(&s).expect("json"));
            }
            Ok(status_table(&s))
        }),
        Command::Sync { command, config: cfg } => internal(cfg, |c| async move {
            match command {
                SyncCommand::Conflicts { open } => {
                    let list: Vec<Conflict> = c.get(&format!("/v1/conflicts?open={open}")).await?;
                    let mut out = format!(
                        "{:>6}  {:<24}  {:<44}  {:<12}  {:<8}  {}\n",
                        "ID", "WHEN (UTC)", "RESOURCE", "POLICY", "STATE", "RESOLUTION"
                    );
                    for x in list {
                        out.push_str(&format!(
                            "{:>6}  {:<24}  {:<44}  {:<12}  {:<8}  {}\n",
                            x.id,
                            hms_edge::fhir::date::format_instant(x.at_ms),
                            x.entity,
                            x.policy,
                            x.state,
                            x.resolution.unwrap_or_default()
                        ));
                    }
                    Ok(out)
                }
                SyncCommand::Resolve { id, keep } => {
                    let _: serde_json::Value = c
                        .post(&format!("/v1/conflicts/{id}/resolve"), &ResolveRequest { keep })
                        .await?;
                    Ok(format!("conflict {id} resolved"))
                }
                SyncCommand::Parked => {
                    let list: Vec<ParkedChange> = c.get("/v1/outbox/parked").await?;
                    let mut out = format!(
                        "{:>10}  {:<6}  {:<44}  {:<8}  {:>8}  {}\n",
                        "SEQ", "KIND", "ENTITY", "OP", "ATTEMPTS", "LAST ERROR"
                    );
                    for p in list {
                        out.push_str(&format!(
                            "{:>10}  {:<6}  {:<44}  {:<8}  {:>8}  {}\n",
                            p.seq,
                            p.kind,
                            p.entity,
                            p.op,
                            p.attempts,
                            p.last_error.unwrap_or_default()
                        ));
                    }
                    Ok(out)
                }
                SyncCommand::Retry { seqs } => {
                    let a: Affected =
                        c.post("/v1/outbox/retry", &serde_json::json!({ "seqs": seqs })).await?;
                    Ok(format!("{} change(s) back in the queue", a.affected))
                }
            }
        }),
        Command::Backup { dest, key } => ops(&key, |state_dir, loc| {
            let master = loc.read_at(loc.path()).map_err(|e| e.to_string())?;
            let mut bar = ProgressBar::new("backup");
            let r = hms_edge::ops::backup::backup(state_dir, &master, &dest, &mut |d, t| {
                bar.update(d, t)
            })
            .map_err(|e| e.to_string())?;
            bar.finish();
            let m = &r.manifest;
            // After the snapshot: the event says where the copy went (the copy itself holds
            // every earlier event).
            hms_edge::ops::audit_admin(
                state_dir,
                &master,
                "backup",
                "store",
                "success",
                Some(format!("to {}", r.dest.display())),
            )
            .map_err(|e| format!("backup written, but its audit event failed: {e}"))?;
            Ok(format!(
                "backup written to {}: {} DICOM instances, {} FHIR resources, {} blobs, \
                 {} files, {:.1} MB in {:.2} s ({:.1} MB/s); key fingerprint {}",
                r.dest.display(),
                m.counts.dicom_instances,
                m.counts.fhir_resources,
                m.counts.blobs,
                m.files.len(),
                m.total_bytes as f64 / 1e6,
                r.elapsed.as_secs_f64(),
                r.mb_per_s(),
                m.key_fingerprint
            ))
        }),
        Command::Restore { src, key } => ops(&key, |state_dir, loc| {
            let master = loc.read_at(loc.path()).map_err(|e| e.to_string())?;
            let mut bar = ProgressBar::new("restore");
            let r = hms_edge::ops::restore::restore(state_dir, &master, &src, &mut |d, t| {
                bar.update(d, t)
            })
            .map_err(|e| e.to_string())?;
            bar.finish();
            let m = &r.manifest;
            hms_edge::ops::audit_admin(
                state_dir,
                &master,
                "restore",
                "store",
                "success",
                Some(format!("from {} (backup of {})", src.display(), m.created_at)),
            )
            .map_err(|e| format!("restored, but the audit event failed: {e}"))?;
            Ok(format!(
                "restored the backup of {} into {}: {} DICOM instances, {} FHIR resources, \
                 {} blobs, {:.1} MB in {:.2} s ({:.1} MB/s)",
                m.created_at,
                state_dir.display(),
                m.counts.dicom_instances,
                m.counts.fhir_resources,
                m.counts.blobs,
                m.total_bytes as f64 / 1e6,
                r.elapsed.as_secs_f64(),
                r.mb_per_s()
            ))
        }),
        Command::RotateKey { key } => ops(&key, |state_dir, loc| {
            let r =
                hms_edge::ops::rotate::rotate(state_dir, loc, None).map_err(|e| e.to_string())?;
            let mut out = String::new();
            if let Some(rec) = &r.recovered {
                out.push_str(&format!("{rec}\n"));
            }
            if r.rotated {
                let master = loc.read_at(loc.path()).map_err(|e| e.to_string())?;
                hms_edge::ops::audit_admin(
                    state_dir,
                    &master,
                    "rotate-key",
                    "master-key",
                    "success",
                    Some(format!("{} -> {}", r.old_fingerprint, r.new_fingerprint)),
                )
                .map_err(|e| format!("key rotated, but the audit event failed: {e}"))?;
                out.push_str(&format!(
                    "master key rotated in {} ({} -> {}): database re-keyed, blob and audit keys \
                     re-wrapped, {} blobs verified under the new key, old key destroyed ({:.2} s)",
                    loc.path().display(),
                    r.old_fingerprint,
                    r.new_fingerprint,
                    r.blobs_verified,
                    r.elapsed.as_secs_f64()
                ));
            }
            Ok(out)
        }),
        Command::Verify { proof, key, rpc } => verify(&proof, key.as_deref(), rpc.as_deref()),
        Command::Audit { command, config: cfg } => audit(cfg, command),
        Command::Dicom {
            command: DicomCommand::Export { sop_instance_uid, file, version, config: cfg },
        } => dicom_export(cfg, &sop_instance_uid, version, &file),
        Command::CheckConfig { file } => {
            let path = config::resolve_path(file);
            match config::load(path.as_deref()) {
                Ok(c) => {
                    let origin =
                        path.map_or("embedded defaults".to_string(), |p| p.display().to_string());
                    println!("# effective configuration from {origin} (environment applied)");
                    print!("{}", c.to_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("hms-edge: {e}");
                    ExitCode::from(78)
                }
            }
        }
    }
}

/// Runs `f` against hms-edged's internal API socket and prints its text.
fn internal<F, Fut>(config_file: Option<PathBuf>, f: F) -> ExitCode
where
    F: FnOnce(InternalClient) -> Fut,
    Fut: std::future::Future<Output = Result<String, ClientError>>,
{
    let path = config::resolve_path(config_file);
    let c = match config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hms-edge: {e}");
            return ExitCode::from(78);
        }
    };
    let socket = hms_edge::sync::internal::socket_path(&c.internal.socket, &c.state_dir());
    let client = InternalClient::new(socket);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match rt.block_on(f(client)) {
        Ok(text) => {
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hms-edge: {e}");
            ExitCode::FAILURE
        }
    }
}

fn age(ms: Option<i64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 120_000 => format!("{}s", ms / 1000),
        Some(ms) if ms < 7_200_000 => format!("{}m", ms / 60_000),
        Some(ms) => format!("{}h", ms / 3_600_000),
    }
}

fn status_table(s: &StatusResponse) -> String {
    let mut out = format!(
        "tenant {}  site {}  open conflicts {}\n\n{:<6}  {:>8}  {:>7}  {:>7}  {:>7}  {:<5}  {:<24}  {:>9}  {:>12}  {}\n",
        s.tenant_id,
        s.site_id,
        s.open_conflicts,
        "QUEUE",
        "PENDING",
        "LEASED",
        "PARKED",
        "OLDEST",
        "LINK",
        "LAST SUCCESS (UTC)",
        "SENT",
        "BYTES SENT",
        "LAST ERROR"
    );
    for ch in &s.channels {
        let a = s.agent.get(&ch.kind).cloned().unwrap_or_default();
        let last = a
            .get("last_success_ms")
            .and_then(serde_json::Value::as_i64)
            .filter(|t| *t > 0)
            .map_or("never".into(), hms_edge::fhir::date::format_instant);
        out.push_str(&format!(
            "{:<6}  {:>8}  {:>7}  {:>7}  {:>7}  {:<5}  {:<24}  {:>9}  {:>12}  {}\n",
            ch.kind,
            ch.pending,
            ch.leased,
            ch.parked,
            age(ch.oldest_age_ms),
            a.get("link").and_then(|v| v.as_str()).unwrap_or("-"),
            last,
            a.get("sent").and_then(serde_json::Value::as_u64).unwrap_or(0),
            a.get("bytes_sent").and_then(serde_json::Value::as_u64).unwrap_or(0),
            a.get("last_error").and_then(|v| v.as_str()).unwrap_or("")
        ));
    }
    out
}

fn verify(proof: &std::path::Path, key: Option<&str>, rpc: Option<&str>) -> ExitCode {
    let text = if proof.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
    } else {
        std::fs::read_to_string(proof)
    };
    let doc: hms_edge::ledger::proof::ProofDoc = match text
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| format!("not a proof document: {e}")))
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("hms-edge: {}: {e}", proof.display());
            return ExitCode::from(2);
        }
    };
    match doc.verify(key) {
        Ok(v) => {
            println!(
                "OK: {} is leaf #{} ({}) of {} at tree size {} (root {}), checkpoint signed by {}{}",
                doc.subject,
                v.leaf_index,
                v.kind,
                v.origin,
                v.tree_size,
                hex::encode(v.root),
                v.key_name,
                if key.is_some() { " (pinned key)" } else { " (key from the document)" }
            );
            match &v.anchor {
                None => println!("anchor: pending (not anchored on chain yet)"),
                Some(a) => println!(
                    "anchor: checkpoint consistent with the tree of size {} anchored on chain {} \
                     by transaction {} in block {} (contract {})",
                    a.size, a.chain_id, a.tx_hash, a.block_number, a.contract
                ),
            }
            if let Some(url) = rpc {
                let Some(a) = &v.anchor else {
                    eprintln!("hms-edge: not anchored on chain yet (anchor: pending)");
                    return ExitCode::FAILURE;
                };
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                match rt.block_on(hms_edge::ledger::rpc::check_anchor(url, a)) {
                    Ok(c) => println!(
                        "OK on chain: Anchored event found in block {} ({} confirmation(s), gas used {})",
                        c.block_number, c.confirmations, c.gas_used
                    ),
                    Err(e) => {
                        eprintln!("hms-edge: anchor does NOT verify on chain: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hms-edge: proof does NOT verify: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `hms-edge audit export`: NDJSON of AuditEvent resources; returns the summary line.
fn audit_export(
    conn: &rusqlite::Connection,
    state_dir: &std::path::Path,
    master: &hms_edge::keys::Key,
    origin: &str,
    since: Option<String>,
    out: Option<PathBuf>,
) -> Result<String, String> {
    use std::io::Write;
    let since_ms = match &since {
        Some(s) => Some(
            hms_edge::fhir::date::parse_range(s)
                .ok_or_else(|| format!("--since {s}: not a FHIR date (e.g. 2026-11-01)"))?
                .0,
        ),
        None => None,
    };
    let mut sink: Box<dyn Write> = match &out {
        Some(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            Box::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(p)
                    .map_err(|e| format!("cannot create {}: {e}", p.display()))?,
            ))
        }
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    // Recorded first: an export that fails half-way is still an access to the trail.
    let target = out.as_ref().map_or("standard output".to_owned(), |p| p.display().to_string());
    hms_edge::ops::audit_admin(
        state_dir,
        master,
        "audit-export",
        "AuditEvent",
        "success",
        Some(format!("since {} to {target}", since.as_deref().unwrap_or("the start"))),
    )
    .map_err(|e| format!("cannot record the export in the audit trail: {e}"))?;
    let observer = format!("hms-edged {origin}");
    let n = hms_edge::audit::for_each(conn, 0, since_ms, |row| {
        let line = hms_edge::audit::to_fhir(&row, &observer).to_string();
        writeln!(sink, "{line}").map_err(hms_edge::store::StoreError::Io)
    })
    .map_err(|e| e.to_string())?;
    sink.flush().map_err(|e| e.to_string())?;
    drop(sink);
    match out {
        Some(p) => Ok(format!("{n} audit event(s) written to {}", p.display())),
        // The data went to standard output: the summary goes to standard error.
        None => {
            eprintln!("{n} audit event(s) exported");
            Ok(String::new())
        }
    }
}

fn audit(config_file: Option<PathBuf>, command: AuditCommand) -> ExitCode {
    let run = || -> Result<(bool, String), String> {
        let path = config::resolve_path(config_file);
        let c = config::load(path.as_deref()).map_err(|e| e.to_string())?;
        let state_dir = c.state_dir();
        let source = hms_edge::keys::KeySource::resolve(&c.keys.master_key_file, &state_dir);
        let (master, _) =
            hms_edge::keys::load_or_generate(&source, false).map_err(|e| e.to_string())?;
        use hms_edge::keys::KeyPurpose;
        let db_path = state_dir.join(hms_edge::store::DB_FILE);
        // The data keys live in the store once the master key was rotated; a box without a
        // store yet (`audit key` before the first start) derives them from the master key.
        let conn = if db_path.exists() {
            Some(
                hms_edge::store::db::open(
                    &db_path,
                    &master.derive(KeyPurpose::Database),
                    true,
                    8192,
                )
                .map_err(|e| format!("cannot open the store in {}: {e}", state_dir.display()))?,
            )
        } else {
            None
        };
        let (audit_key, signing_seed) = match &conn {
            Some(conn) => {
                let dk = hms_edge::store::data_keys(conn, &master).map_err(|e| e.to_string())?;
                (dk.audit, dk.ledger_signing)
            }
            None => {
                (master.derive(KeyPurpose::AuditHmac), master.derive(KeyPurpose::LedgerSigning))
            }
        };
        let signer = hms_edge::ledger::note::NoteSigner::from_seed(
            signing_seed.expose(),
            &c.ledger_origin(),
        );
        match command {
            AuditCommand::Key => Ok((true, signer.vkey())),
            AuditCommand::Export { since, out } => {
                let conn = conn.ok_or_else(|| format!("no store in {}", state_dir.display()))?;
                let n = audit_export(&conn, &state_dir, &master, &c.ledger_origin(), since, out)?;
                Ok((true, n))
            }
            AuditCommand::Check => {
                let conn = conn.ok_or_else(|| format!("no store in {}", state_dir.display()))?;
                let vkey = hms_edge::ledger::note::VKey::parse(&signer.vkey())?;
                let r = hms_edge::ledger::check::run(&conn, &audit_key, &vkey)
                    .map_err(|e| e.to_string())?;
                let mut out = String::new();
                for p in &r.problems {
                    out.push_str(&format!("FAIL {p}\n"));
                }
                out.push_str(&format!(
                    "{}: {} leaves recomputed from the store, {} signed checkpoint(s) and {} chain \
                     anchor(s) checked, newest valid checkpoint at size {}; {} problem(s)\n",
                    if r.ok() { "OK" } else { "TAMPERED" },
                    r.leaves,
                    r.checkpoints,
                    r.anchors,
                    r.checked_size,
                    r.problems.len()
                ));
                Ok((r.ok(), out))
            }
        }
    };
    match run() {
        Ok((ok, text)) => {
            if !text.is_empty() {
                print!("{text}");
                if !text.ends_with('\n') {
                    println!();
                }
            }
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("hms-edge: {e}");
            ExitCode::from(2)
        }
    }
}

fn dicom_export(
    config_file: Option<PathBuf>,
    sop_uid: &str,
    version: Option<i64>,
    dest: &std::path::Path,
) -> ExitCode {
    let run = || -> Result<String, String> {
        let path = config::resolve_path(config_file);
        let c = config::load(path.as_deref()).map_err(|e| e.to_string())?;
        let state_dir = c.state_dir();
        let source = hms_edge::keys::KeySource::resolve(&c.keys.master_key_file, &state_dir);
        let (key, _) =
            hms_edge::keys::load_or_generate(&source, false).map_err(|e| e.to_string())?;
        let inst =
            hms_edge::dicom::export::export_offline(&state_dir, &key, sop_uid, version, dest)
                .map_err(|e| e.to_string())?;
        Ok(format!(
            "exported {} (version {}, {} bytes, transfer syntax {}) to {}",
            inst.sop_uid,
            inst.version,
            inst.size,
            inst.transfer_syntax,
            dest.display()
        ))
    };
    match run() {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hms-edge: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the config, resolves the state folder and the master key's location, and runs `f`.
fn ops<F>(args: &KeyArgs, f: F) -> ExitCode
where
    F: FnOnce(&std::path::Path, &hms_edge::ops::rotate::KeyLocation) -> Result<String, String>,
{
    use hms_edge::keys::KeySource;
    use hms_edge::ops::rotate::KeyLocation;
    // Files we create (backup, staging, keys) are private, and no core dump holds the key.
    hms_edge::keys::harden_process();
    let run = || -> Result<String, String> {
        let path = config::resolve_path(args.config.clone());
        let c = config::load(path.as_deref()).map_err(|e| e.to_string())?;
        let state_dir = c.state_dir();
        let loc = if let Some(p) = &args.key_file {
            KeyLocation::File(p.clone())
        } else if let Some(p) = &args.credential {
            KeyLocation::Credential(p.clone())
        } else {
            match KeySource::resolve(&c.keys.master_key_file, &state_dir) {
                KeySource::Credential(p) => KeyLocation::File(p),
                KeySource::File(p) if !c.keys.master_key_file.as_os_str().is_empty() => {
                    KeyLocation::File(p)
                }
                KeySource::File(p) if p.exists() => KeyLocation::File(p),
                KeySource::File(p) => {
                    if std::path::Path::new(PACKAGED_CREDENTIAL).exists() {
                        KeyLocation::Credential(PACKAGED_CREDENTIAL.into())
                    } else if std::path::Path::new(PACKAGED_KEY_FILE).exists() {
                        KeyLocation::File(PACKAGED_KEY_FILE.into())
                    } else {
                        KeyLocation::File(p)
                    }
                }
            }
        };
        f(&state_dir, &loc)
    };
    match run() {
        Ok(msg) => {
            if !msg.is_empty() {
                println!("{msg}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hms-edge: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A progress line on stderr, drawn only when stderr is a terminal.
struct ProgressBar {
    label: &'static str,
    tty: bool,
    started: std::time::Instant,
    last: Option<std::time::Instant>,
}

impl ProgressBar {
    fn new(label: &'static str) -> Self {
        use std::io::IsTerminal;
        ProgressBar {
            label,
            tty: std::io::stderr().is_terminal(),
            started: std::time::Instant::now(),
            last: None,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.tty {
            return;
        }
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now - t < std::time::Duration::from_millis(100))
            && done < total
        {
            return;
        }
        self.last = Some(now);
        let frac = if total == 0 { 1.0 } else { done as f64 / total as f64 };
        let width = 30;
        let filled = ((frac * width as f64) as usize).min(width);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r{} [{}{}] {:>5.1}%  {:.1}/{:.1} MB  {:.1} MB/s ",
            self.label,
            "#".repeat(filled),
            "-".repeat(width - filled),
            frac * 100.0,
            done as f64 / 1e6,
            total as f64 / 1e6,
            done as f64 / 1e6 / secs
        );
    }

    fn finish(&mut self) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
    }
}
