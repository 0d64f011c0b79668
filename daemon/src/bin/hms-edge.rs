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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
