//! Admin listener (default 127.0.0.1:9464): `/healthz`, `/readyz`, `/metrics` (Prometheus text),
//! and the site IT status page at `/` and `/status` ([`crate::site_status`]).
//! Unauthenticated by design, so it must stay on loopback; it never serves patient data.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::space::human_bytes;
use crate::server::Daemon;
use crate::store::Store;
use crate::store::space::Pressure;

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

/// Counters that exist from the start at 0, so `/metrics` always lists them (a rate over a
/// counter that appears only at its first event misses that event, and the Grafana dashboard's
/// queries stay valid on a quiet box).
pub fn register_counters() {
    for name in [
        "hms_store_writes_total",
        "hms_store_commits_total",
        "hms_dicom_associations_total",
        "hms_dicom_aborts_total",
        "hms_dicom_bytes_received_total",
        "hms_dicom_store_abandoned_total",
        "hms_dicom_echo_total",
        "hms_dicom_find_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in ["busy", "policy"] {
        metrics::counter!("hms_dicom_associations_rejected_total", "reason" => reason).increment(0);
    }
    metrics::gauge!("hms_dicom_associations_active").increment(0.0);
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/", get(status_page))
        .route("/status", get(status_page))
        .with_state(daemon)
}

async fn readyz(State(d): State<Arc<Daemon>>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if let Err(why) = d.store.probe().await {
        problems.push(why);
    }
    let space = d.store.space();
    match space.measure() {
        Ok(s) => {
            let p = space.policy();
            let pressure = p.pressure(s);
            if pressure >= Pressure::Critical {
                problems.push(format!(
                    "low disk space: {} free, {} required ({})",
                    human_bytes(s.free),
                    human_bytes(p.critical_free.bytes_of(s.total)),
                    pressure.as_str()
                ));
            }
        }
        Err(_) => problems.push("cannot read free disk space".into()),
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

/// The status page: HTML, no script, nothing loaded from elsewhere (the CSP says so too).
async fn status_page(State(d): State<Arc<Daemon>>, headers: HeaderMap) -> impl IntoResponse {
    // A browser is the one client that can be steered here by another site (DNS rebinding: a
    // name of theirs resolving to 127.0.0.1); it then sends that name as Host. Loopback users
    // and SSH tunnels send an address or `localhost`.
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if !host_is_address_or_localhost(host) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "use an IP address or localhost to reach the admin listener\n".to_string(),
        )
            .into_response();
    }
    let page = crate::site_status::render(&crate::site_status::gather(&d).await);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; \
                 form-action 'none'; base-uri 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        page,
    )
        .into_response()
}

/// `127.0.0.1:9464`, `[::1]:9464`, `localhost`, `10.1.2.3`… but not `evil.example:9464`.
fn host_is_address_or_localhost(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, _)) => return v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

async fn metrics_text(State(d): State<Arc<Daemon>>) -> impl IntoResponse {
    metrics::gauge!("hms_uptime_seconds").set(d.started.elapsed().as_secs_f64());
    let root = d.store.root().to_owned();
    if let Ok((db, count, bytes)) = d.store.read(move |c| Store::sizes(c, &root)).await {
        metrics::gauge!("hms_store_db_bytes").set(db as f64);
        metrics::gauge!("hms_store_blobs").set(count as f64);
        metrics::gauge!("hms_store_blob_bytes").set(bytes as f64);
    }
    if let Ok(sp) = d.store.space().measure() {
        metrics::gauge!("hms_disk_free_bytes").set(sp.free as f64);
        metrics::gauge!("hms_disk_total_bytes").set(sp.total as f64);
        let pressure = d.store.space().policy().pressure(sp);
        metrics::gauge!("hms_disk_pressure").set(pressure as u8 as f64);
    }
    let (images, records) = d.store.space().refused();
    metrics::gauge!("hms_writes_refused_no_space", "class" => "images").set(images as f64);
    metrics::gauge!("hms_writes_refused_no_space", "class" => "records").set(records as f64);
    sync_metrics(&d).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], d.metrics.render())
}

/// Per sync channel: queue depth, leased and parked changes, age of the oldest unsynced change,
/// and what the agent last reported (last success, bytes sent, conflicts, link state).
async fn sync_metrics(d: &Daemon) {
    let read = d
        .store
        .read(|c| {
            let channels = crate::sync::outbox::status(c)?;
            let conflicts = crate::sync::outbox::open_conflicts(c)?;
            let mut agent = Vec::new();
            for ch in &channels {
                let key = format!("status.{}", ch.kind);
                if let Some((v, _)) = Store::kv_get(c, crate::sync::internal::STATE_NS, &key)? {
                    agent.push((
                        ch.kind.clone(),
                        serde_json::from_slice::<serde_json::Value>(&v).ok(),
                    ));
                }
            }
            Ok((channels, conflicts, agent))
        })
        .await;
    let Ok((channels, conflicts, agent)) = read else { return };
    for ch in channels {
        let k = ch.kind.clone();
        metrics::gauge!("hms_sync_queue_pending", "channel" => k.clone()).set(ch.pending as f64);
        metrics::gauge!("hms_sync_queue_leased", "channel" => k.clone()).set(ch.leased as f64);
        metrics::gauge!("hms_sync_parked", "channel" => k.clone()).set(ch.parked as f64);
        metrics::gauge!("hms_sync_oldest_unsynced_seconds", "channel" => k)
            .set(ch.oldest_age_ms.unwrap_or(0) as f64 / 1000.0);
    }
    metrics::gauge!("hms_sync_open_conflicts").set(conflicts as f64);
    for (kind, v) in agent {
        let Some(v) = v else { continue };
        let num = |key: &str| v.get(key).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
        metrics::gauge!("hms_sync_last_success_timestamp_seconds", "channel" => kind.clone())
            .set(num("last_success_ms") / 1000.0);
        metrics::gauge!("hms_sync_bytes_sent", "channel" => kind.clone()).set(num("bytes_sent"));
        metrics::gauge!("hms_sync_sent", "channel" => kind.clone()).set(num("sent"));
        metrics::gauge!("hms_sync_conflicts", "channel" => kind.clone()).set(num("conflicts"));
        let up = v.get("link").and_then(|l| l.as_str()) == Some("up");
        metrics::gauge!("hms_sync_link_up", "channel" => kind).set(if up { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_page_hosts() {
        use super::host_is_address_or_localhost as ok;
        for h in [
            "127.0.0.1:9464",
            "127.0.0.1",
            "[::1]:9464",
            "localhost:9464",
            "LOCALHOST",
            "10.0.0.5:80",
        ] {
            assert!(ok(h), "{h}");
        }
        for h in [
            "",
            "evil.example",
            "evil.example:9464",
            "localhost.evil.example",
            "[::1",
            "127.0.0.1.nip.io:9464",
        ] {
            assert!(!ok(h), "{h}");
        }
    }
}
