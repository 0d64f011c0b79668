//! `hms-edge`: the site IT admin's command line. One module per command group; the library
//! does the work, these modules parse, call and print.

mod audit_cmd;
mod cli;
mod dicom_cmd;
mod internal_cmd;
mod ops_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hms_edge::config;

use cli::{Cli, Command, DicomCommand};

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Status { json, config: cfg } => internal_cmd::status(cfg, json),
        Command::Sync { command, config: cfg } => internal_cmd::sync(cfg, command),
        Command::Backup { dest, key } => ops_cmd::backup(&dest, &key),
        Command::Restore { src, key } => ops_cmd::restore(&src, &key),
        Command::RotateKey { key } => ops_cmd::rotate_key(&key),
        Command::Verify { proof, key, rpc } => {
            audit_cmd::verify(&proof, key.as_deref(), rpc.as_deref())
        }
        Command::Audit { command, config: cfg } => audit_cmd::audit(cfg, command),
        Command::Dicom {
            command: DicomCommand::Export { sop_instance_uid, file, version, config: cfg },
        } => dicom_cmd::dicom_export(cfg, &sop_instance_uid, version, &file),
        Command::Dicom { command: DicomCommand::Pin { study, config: cfg } } => {
            dicom_cmd::pin(cfg, &study, true)
        }
        Command::Dicom { command: DicomCommand::Unpin { study, config: cfg } } => {
            dicom_cmd::pin(cfg, &study, false)
        }
        Command::Dicom { command: DicomCommand::Evict { study, before, dry_run, config: cfg } } => {
            dicom_cmd::evict(cfg, study, before.as_deref(), dry_run)
        }
        Command::CheckConfig { file } => check_config(file),
    }
}

/// `hms-edge check-config [FILE]`: prints the effective configuration.
fn check_config(file: Option<PathBuf>) -> ExitCode {
    let path = config::resolve_path(file);
    match config::load(path.as_deref()) {
        Ok(c) => {
            let origin = path.map_or("embedded defaults".to_string(), |p| p.display().to_string());
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
