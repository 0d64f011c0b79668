//! `hms-edge`: the site IT admin's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hms_edge::config;

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
