//! `hms-edge-agent`: the WAN side of hms-edge. It pushes the edge's changes to the tenant's cloud
//! FHIR server and pulls the cloud's changes back, forwards received studies to the cloud PACS,
//! and publishes events to the broker. It holds the upstream credentials and never the store key:
//! everything it reads or writes at the edge goes through hms-edged's internal API socket.
//!
//! Each channel (fhir, dicom, event) runs its own loop with its own backoff, so a failing PACS
//! never holds up FHIR sync and a missing broker never holds up either.

mod backoff;
mod chain;
mod channel;
mod cstore;
mod dicom_forward;
mod events;
mod fhir_sync;
mod mqtt;
mod recall;
mod upstream;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hms_edge_config::{self as config, Config};
use hms_edge_config::{keys, logging};
use hms_edge_wire::api::{Affected, CHANNELS, StatusResponse};
use hms_edge_wire::client::InternalClient;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::channel::{ChannelStats, run_loop};
use crate::dicom_forward::Transport;
use hms_edge_config::PacsMode;

/// The WAN side of the hms-edge appliance: upstream FHIR sync, DICOM forwarding, MQTT events.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Config file (the same edge.toml as hms-edged). Default: $HMS_EDGE_CONFIG, else
    /// /etc/hms-edge/edge.toml when it exists, else the embedded development defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Chain anchoring of the integrity ledger.
    Chain {
        #[command(subcommand)]
        command: ChainCommand,
    },
}

#[derive(Debug, clap::Subcommand)]
enum ChainCommand {
    /// Deploy the LedgerAnchor contract with the anchoring key (chain.key_file or the systemd
    /// credential chain-key) through chain.rpc_url; prints the address to set as chain.contract.
    Deploy,
}

/// sysexits EX_CONFIG (the unit does not restart on it).
const EXIT_CONFIG: u8 = 78;
/// Seconds between `health` events.
const HEALTH_EVERY: Duration = Duration::from_secs(300);

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    keys::harden_process();
    let path = config::resolve_path(args.config.clone());
    let config = match config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hms-edge-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _log = logging::init(&config.log);
    // ring as the process-wide rustls provider (ring and aws-lc-rs both get compiled in
    // through dependencies; rustls refuses to guess).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hms-edge-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Chain { command: ChainCommand::Deploy }) = args.command {
        return match runtime.block_on(chain::deploy(&config.chain)) {
            Ok((addr, gas)) => {
                println!("{addr:#x}");
                eprintln!(
                    "hms-edge-agent: LedgerAnchor deployed at {addr:#x} (gas {gas}); set chain.contract"
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("hms-edge-agent: deploy failed: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("hms-edge-agent: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let socket = hms_edge_wire::socket_path(&cfg.internal.socket, &cfg.state_dir());
    let internal = InternalClient::new(&socket);
    let timeout = Duration::from_secs(cfg.upstream.request_timeout_secs);
    let http = upstream::http_client(&cfg.upstream.ca_file, timeout)?;
    let fhir = upstream::FhirUpstream::from_config(&cfg, http.clone())?;
    let shutdown = CancellationToken::new();
    // The unit sets WatchdogSec=: feed it from the runtime (proves the agent is not wedged),
    // from the start, as waiting for hms-edged may take longer than the period. Not tied to
    // hms-edged or upstream answering: their outages must not restart the agent.
    if let Some(period) = sd_notify::watchdog_enabled() {
        let s = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    }
                    () = s.cancelled() => return,
                }
            }
        });
    }
    let wake = Arc::new(Notify::new());
    events::ENABLED.store(!cfg.mqtt.url.is_empty(), std::sync::atomic::Ordering::Relaxed);
    let mqtt = mqtt::Mqtt::start(
        &cfg.mqtt,
        &cfg.site.tenant_id,
        &cfg.site.site_id,
        internal.clone(),
        wake.clone(),
        shutdown.clone(),
    )?;

    // hms-edged may still be starting (or restarting): wait for its socket, then take back
    // the leases a previous incarnation of this agent held.
    let mut backoff = backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let status: StatusResponse = loop {
        match internal.get("/v1/status").await {
            Ok(s) => break s,
            Err(e) => {
                let wait = backoff.fail();
                if backoff.failures() == 1 || backoff.failures().is_multiple_of(10) {
                    tracing::warn!(error = %e, "waiting for hms-edged");
                }
                tokio::time::sleep(wait).await;
            }
        }
    };
    if status.tenant_id != cfg.site.tenant_id {
        anyhow::bail!(
            "hms-edged serves tenant {:?} but this agent is configured for {:?}",
            status.tenant_id,
            cfg.site.tenant_id
        );
    }
    for kind in CHANNELS {
        let _: Affected = internal.post("/v1/outbox/release", &json!({ "kind": kind })).await?;
    }
    tracing::info!(
        socket = %socket.display(),
        tenant = %cfg.site.tenant_id,
        site = %cfg.site.site_id,
        fhir = %fhir.as_ref().map_or("off".to_owned(), |f| f.base.clone()),
        pacs = %match cfg.pacs.mode {
            PacsMode::Dicomweb if !cfg.pacs.dicomweb_url.is_empty() => cfg.pacs.dicomweb_url.clone(),
            PacsMode::Cstore if !cfg.pacs.dicom_address.is_empty() => format!("C-STORE {}", cfg.pacs.dicom_address),
            _ => "off".into(),
        },
        mqtt = %if cfg.mqtt.url.is_empty() { "off" } else { cfg.mqtt.url.as_str() },
        "hms-edge-agent started"
    );
    if fhir.is_none()
        && cfg.pacs.dicomweb_url.is_empty()
        && cfg.pacs.dicom_address.is_empty()
        && mqtt.is_none()
    {
        tracing::info!("no upstream configured: changes wait in the outbox until one is");
    }

    let interval = Duration::from_secs(cfg.upstream.interval_secs);
    let max_backoff = Duration::from_secs(cfg.upstream.max_backoff_secs);
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(up) = fhir {
        let sync = Arc::new(fhir_sync::FhirSync {
            up,
            internal: internal.clone(),
            cfg: cfg.upstream.clone(),
            site_id: cfg.site.site_id.clone(),
            stats: Arc::new(ChannelStats::default()),
            uncertain: Default::default(),
        });
        let (i, st, w, s) = (internal.clone(), sync.stats.clone(), wake.clone(), shutdown.clone());
        tasks.spawn(async move {
            run_loop("fhir", i, st, interval, max_backoff, w, s, || {
                let sync = sync.clone();
                async move { sync.round().await }
            })
            .await
        });
    }
    let transport = match cfg.pacs.mode {
        PacsMode::Dicomweb if !cfg.pacs.dicomweb_url.is_empty() => Some(Transport::DicomWeb),
        PacsMode::Cstore if !cfg.pacs.dicom_address.is_empty() => {
            Some(Transport::CStore(cstore::DicomPacs {
                address: cfg.pacs.dicom_address.clone(),
                calling_ae: cfg.pacs.calling_ae_title.clone(),
            }))
        }
        _ => None,
    };
    if let Some(transport) = transport {
        let fwd = Arc::new(dicom_forward::DicomForward {
            transport,
            http: http.clone(),
            base: cfg.pacs.dicomweb_url.trim_end_matches('/').to_owned(),
            batch: cfg.pacs.batch_instances,
            verify: cfg.pacs.verify,
            internal: internal.clone(),
            stats: Arc::new(ChannelStats::default()),
        });
        let (i, st, w, s) = (internal.clone(), fwd.stats.clone(), wake.clone(), shutdown.clone());
        tasks.spawn(async move {
            run_loop("dicom", i, st, interval, max_backoff, w, s, || {
                let fwd = fwd.clone();
                async move { fwd.round().await }
            })
            .await
        });
    }
    // Recall: evicted studies a retrieve at the edge asks for, fetched back by WADO-RS.
    if !cfg.pacs.dicomweb_url.is_empty() {
        let r = Arc::new(recall::Recall {
            http: http.clone(),
            base: cfg.pacs.dicomweb_url.trim_end_matches('/').to_owned(),
            internal: internal.clone(),
            stats: Arc::new(ChannelStats::default()),
        });
        let (i, st, w, s) = (internal.clone(), r.stats.clone(), wake.clone(), shutdown.clone());
        // A retrieve is waiting: a short interval of its own.
        let every = interval.min(Duration::from_secs(1));
        tasks.spawn(async move {
            run_loop("recall", i, st, every, max_backoff, w, s, || {
                let r = r.clone();
                async move { r.round().await }
            })
            .await
        });
    }
    if let Some(m) = mqtt {
        let m = Arc::new(m);
        let (i, st, w, s) = (internal.clone(), m.stats.clone(), wake.clone(), shutdown.clone());
        // Events are small and should go out promptly: a short interval of their own.
        let every = interval.min(Duration::from_secs(2));
        tasks.spawn(async move {
            run_loop("event", i, st, every, max_backoff, w, s, || {
                let m = m.clone();
                async move { m.round().await }
            })
            .await
        });
    }
    if !cfg.chain.rpc_url.is_empty() && !cfg.chain.contract.is_empty() {
        let anchorer = chain::Anchorer::new(&cfg.chain, internal.clone())?;
        tracing::info!(rpc = %cfg.chain.rpc_url, contract = %cfg.chain.contract, "chain anchoring on");
        tasks.spawn(anchorer.run(shutdown.clone()));
    }
    {
        let (i, s) = (internal.clone(), shutdown.clone());
        let started = std::time::Instant::now();
        tasks.spawn(async move {
            loop {
                if let Ok(st) = i.get::<StatusResponse>("/v1/status").await {
                    let queues: serde_json::Map<String, serde_json::Value> = st
                        .channels
                        .iter()
                        .map(|c| {
                            (c.kind.clone(), json!({ "pending": c.pending, "parked": c.parked }))
                        })
                        .collect();
                    events::record(
                        &i,
                        "health",
                        json!({ "uptime_s": started.elapsed().as_secs(), "queues": queues,
                                "open_conflicts": st.open_conflicts }),
                    )
                    .await;
                }
                tokio::select! {
                    () = tokio::time::sleep(HEALTH_EVERY) => {}
                    () = s.cancelled() => return,
                }
            }
        });
    }

    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("syncing"),
    ]);
    tracing::info!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    // A round in flight finishes its request or is dropped; anything unacknowledged stays in
    // the outbox and its lease runs out (or is released at the next start).
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}
