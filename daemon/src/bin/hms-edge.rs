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
}

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

fn audit(config_file: Option<PathBuf>, command: AuditCommand) -> ExitCode {
    let run = || -> Result<(bool, String), String> {
        let path = config::resolve_path(config_file);
        let c = config::load(path.as_deref()).map_err(|e| e.to_string())?;
        let state_dir = c.state_dir();
        let source = hms_edge::keys::KeySource::resolve(&c.keys.master_key_file, &state_dir);
        let (master, _) =
            hms_edge::keys::load_or_generate(&source, false).map_err(|e| e.to_string())?;
        let signer = hms_edge::ledger::note::NoteSigner::from_master(&master, &c.ledger_origin());
        match command {
            AuditCommand::Key => Ok((true, signer.vkey())),
            AuditCommand::Check => {
                use hms_edge::keys::KeyPurpose;
                let conn = hms_edge::store::db::open(
                    &state_dir.join(hms_edge::store::DB_FILE),
                    &master.derive(KeyPurpose::Database),
                    true,
                    8192,
                )
                .map_err(|e| format!("cannot open the store in {}: {e}", state_dir.display()))?;
                let vkey = hms_edge::ledger::note::VKey::parse(&signer.vkey())?;
                let r = hms_edge::ledger::check::run(
                    &conn,
                    &master.derive(KeyPurpose::AuditHmac),
                    &vkey,
                )
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
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
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
