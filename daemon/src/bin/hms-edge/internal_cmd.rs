//! `hms-edge status` and `hms-edge sync …`: calls to hms-edged's internal API socket.

use std::path::PathBuf;
use std::process::ExitCode;

use hms_edge::config;
use hms_edge::sync::api::{Affected, Conflict, ParkedChange, ResolveRequest, StatusResponse};
use hms_edge::sync::client::{ClientError, InternalClient};

use crate::cli::SyncCommand;

/// `hms-edge status [--json]`.
pub fn status(cfg: Option<PathBuf>, json: bool) -> ExitCode {
    internal(cfg, |c| async move {
        let s: StatusResponse = c.get("/v1/status").await?;
        if json {
            return Ok(serde_json::to_string_pretty(&s).expect("json"));
        }
        Ok(status_table(&s))
    })
}

/// `hms-edge sync …`.
pub fn sync(cfg: Option<PathBuf>, command: SyncCommand) -> ExitCode {
    internal(cfg, |c| async move {
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
    })
}

/// Runs `f` against hms-edged's internal API socket and prints its text.
pub fn internal<F, Fut>(config_file: Option<PathBuf>, f: F) -> ExitCode
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
