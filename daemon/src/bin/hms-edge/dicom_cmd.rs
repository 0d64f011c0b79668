//! `hms-edge dicom export`: one stored instance as a Part 10 file, without the daemon.

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
