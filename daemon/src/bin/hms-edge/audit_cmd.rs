//! `hms-edge audit key | check | export` and `hms-edge verify`: the integrity ledger from the
//! command line (the store opened read-only through `store::offline`; `verify` needs neither key
//! nor store).

use std::path::PathBuf;
use std::process::ExitCode;

use hms_edge::config;

use crate::cli::AuditCommand;

pub fn verify(proof: &std::path::Path, key: Option<&str>, rpc: Option<&str>) -> ExitCode {
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

pub fn audit(config_file: Option<PathBuf>, command: AuditCommand) -> ExitCode {
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
        let conn =
            if db_path.exists() {
                Some(hms_edge::store::offline::open(&state_dir, &master, true).map_err(|e| {
                    format!("cannot open the store in {}: {e}", state_dir.display())
                })?)
            } else {
                None
            };
        let (conn, audit_key, signing_seed) = match conn {
            Some((conn, dk)) => (Some(conn), dk.audit, dk.ledger_signing),
            None => (
                None,
                master.derive(KeyPurpose::AuditHmac),
                master.derive(KeyPurpose::LedgerSigning),
            ),
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
