//! `hms-edge-agent`: the WAN side of hms-edge (upstream FHIR sync, DICOM forwarding, MQTT, chain
//! anchoring). Not built yet: see issue 5. Until then it refuses to run rather than pretend.

use std::process::ExitCode;

use clap::Parser;

/// The WAN side of the hms-edge appliance.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {}

fn main() -> ExitCode {
    let _args = Args::parse();
    eprintln!("hms-edge-agent: the sync agent is not part of this build yet (see ARCHITECTURE.md)");
    ExitCode::from(69) // EX_UNAVAILABLE
}
