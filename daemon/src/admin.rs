//! Admin listener (default 127.0.0.1:9464): `/healthz`, `/readyz`, `/metrics` (Prometheus text).
//! Unauthenticated by design, so it must stay on loopback; it never serves patient data.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::server::Daemon;
use crate::store::Store;

/// The process-wide Prometheus recorder (installed once, even when tests start several daemons).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed already; then ours just stays unused.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(daemon)
}

/// Free bytes for unprivileged users on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

async fn readyz(State(d): State<Arc<Daemon>>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if d.store.read(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?)).await.is_err() {
        problems.push("store not readable".to_string());
    }
    let min = d.config().admin.min_free_disk_mb * 1024 * 1024;
    match free_bytes(d.store.root()) {
        Some(free) if free < min => problems.push(format!(
            "low disk space: {} MiB free, {} MiB required",
            free / (1024 * 1024),
            min / (1024 * 1024)
        )),
        None => problems.push("cannot read free disk space".into()),
        Some(_) => {}
    }
    if d.shutdown.is_cancelled() {
        problems.push("shutting down".into());
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", problems.join("; ")))
    }
}

async fn metrics_text(State(d): State<Arc<Daemon>>) -> impl IntoResponse {
    metrics::gauge!("hms_uptime_seconds").set(d.started.elapsed().as_secs_f64());
    let root = d.store.root().to_owned();
    if let Ok((db, count, bytes)) = d.store.read(move |c| Store::sizes(c, &root)).await {
        metrics::gauge!("hms_store_db_bytes").set(db as f64);
        metrics::gauge!("hms_store_blobs").set(count as f64);
        metrics::gauge!("hms_store_blob_bytes").set(bytes as f64);
    }
    if let Some(free) = free_bytes(d.store.root()) {
        metrics::gauge!("hms_disk_free_bytes").set(free as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], d.metrics.render())
}
