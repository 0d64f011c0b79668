//! `hms-edged`: parse arguments, load the config, start, serve until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hms_edge::{config, keys, logging, server, tls};

/// mimalloc instead of glibc malloc: a FHIR transaction Bundle of a few MB becomes tens of MB of
/// parsed JSON for a moment; glibc kept those pages in its per-thread arenas after the request,
/// so the daemon's RSS stayed at its peak. mimalloc returns freed pages to the system.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The LAN side of the hms-edge appliance: DICOM receiver, FHIR cache, encrypted store.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Config file. Default: $HMS_EDGE_CONFIG, else /etc/hms-edge/edge.toml when it exists, else
    /// the embedded development defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

/// sysexits EX_CONFIG: systemd units use RestartPreventExitStatus= on it, so a broken config is
/// reported instead of restarted in a loop.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let args = Args::parse();
    keys::harden_process();
    let path = config::resolve_path(args.config);
    let config = match config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hms-edged: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let log = logging::init(&config.log);
    tls::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let (daemon, listeners) = server::start(config, path, Some(log)).await?;
        server::run(daemon, listeners, std::future::pending()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("hms-edged: {e}");
            match e {
                server::StartError::Config(_)
                | server::StartError::Key(_)
                | server::StartError::RotationInterrupted { .. } => ExitCode::from(EXIT_CONFIG),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
