//! `hms-edge dicom export`: one stored instance as a Part 10 file, without the daemon.
//! `hms-edge dicom pin|unpin|evict`: the storage lifecycle, asked of the running daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use hms_edge::config;

pub fn dicom_export(
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

/// `hms-edge dicom pin|unpin STUDY`.
pub fn pin(cfg: Option<PathBuf>, study: &str, pinned: bool) -> ExitCode {
    let study = study.to_owned();
    crate::internal_cmd::internal(cfg, |c| async move {
        let req =
            hms_edge::sync::internal::PinRequest { pinned, actor: hms_edge::audit::local_actor() };
        let _: serde_json::Value = c.post(&format!("/v1/dicom/studies/{study}/pin"), &req).await?;
        Ok(if pinned {
            format!("study {study} pinned: eviction will not take it")
        } else {
            format!("study {study} unpinned")
        })
    })
}

/// `hms-edge dicom evict (--study UID | --before DATE) [--dry-run]`.
pub fn evict(
    cfg: Option<PathBuf>,
    study: Option<String>,
    before: Option<&str>,
    dry_run: bool,
) -> ExitCode {
    use hms_edge::dicom::evict::{EvictReport, EvictRequest};
    use hms_edge::fhir::date::format_instant;
    let before_ms = match before.map(|b| hms_edge::fhir::date::parse_range(b).map(|(lo, _)| lo)) {
        Some(None) => {
            eprintln!(
                "hms-edge: --before {:?}: expected a date like 2026-01-31",
                before.unwrap_or("")
            );
            return ExitCode::from(2);
        }
        Some(Some(t)) => Some(t),
        None => None,
    };
    crate::internal_cmd::internal(cfg, |c| async move {
        let call = hms_edge::sync::internal::EvictCall {
            request: EvictRequest { study, before_ms, dry_run },
            actor: hms_edge::audit::local_actor(),
        };
        let r: EvictReport = c.post("/v1/dicom/evict", &call).await?;
        let mut out = format!(
            "{:<64}  {:>9}  {:>12}  {:<24}  {}\n",
            "STUDY", "INSTANCES", "BYTES", "LAST USED (UTC)", "OUTCOME"
        );
        for s in &r.studies {
            let outcome = match s.kept {
                None if r.dry_run => "would be evicted".to_owned(),
                None => "evicted".to_owned(),
                Some(k) => format!(
                    "kept: {}",
                    serde_json::to_value(k)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ),
            };
            out.push_str(&format!(
                "{:<64}  {:>9}  {:>12}  {:<24}  {outcome}\n",
                s.study_uid,
                s.instances,
                s.bytes,
                format_instant(s.last_use_ms)
            ));
        }
        out.push_str(&format!(
            "{} {} studies, {} bytes ({})\n",
            if r.dry_run { "dry run: would evict" } else { "evicted" },
            r.evicted,
            r.bytes,
            hms_edge::config::space::human_bytes(r.bytes)
        ));
        Ok(out)
    })
}
