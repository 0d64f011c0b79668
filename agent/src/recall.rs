//! Recall channel: evicted instances that a retrieve at the edge asked for are fetched back from
//! the cloud PACS by WADO-RS, one instance per request (as stored there: `transfer-syntax=*`),
//! and handed to hms-edged, which keeps them only if the data set is the one it received first
//! (SHA-256) — so a PACS that answers with something else changes nothing at the edge.

use std::sync::Arc;

use bytes::Bytes;
use hms_edge_dicom::multipart::{Event, MediaType, Parser};
use hms_edge_wire::api::*;
use hms_edge_wire::client::InternalClient;
use http_body_util::BodyExt;
use serde_json::Value;

use crate::channel::{ChannelStats, RoundError};
use crate::upstream::{UpstreamError, without_url};

/// Studies leased per round (each may be many instances).
pub const BATCH: u32 = 4;
/// Lease length: one study over a slow link.
pub const LEASE_SECS: u32 = 900;
/// Retry delay after a failed recall, seconds (a waiting retrieve has already been told why).
pub const RETRY_SECS: u32 = 15;
/// Failed attempts before a recall is parked for site IT.
pub const MAX_ATTEMPTS: i64 = 20;

/// The recall channel (DICOMweb to the cloud PACS).
#[derive(Debug)]
pub struct Recall {
    pub http: reqwest::Client,
    /// DICOMweb base, without a trailing slash.
    pub base: String,
    pub internal: InternalClient,
    pub stats: Arc<ChannelStats>,
}

impl Recall {
    /// Fetches back what is asked for. `Ok(true)`: more may be waiting.
    pub async fn round(&self) -> Result<bool, RoundError> {
        let lease: LeaseResponse = self
            .internal
            .post(
                "/v1/outbox/lease",
                &LeaseRequest { kind: "recall".into(), max: BATCH, lease_secs: LEASE_SECS },
            )
            .await?;
        if lease.entries.is_empty() {
            return Ok(false);
        }
        let mut first_error: Option<RoundError> = None;
        for e in lease.entries {
            let detail = e.detail.clone().unwrap_or(Value::Null);
            let instances =
                detail.get("instances").and_then(Value::as_array).cloned().unwrap_or_default();
            let mut result = Ok(0u64);
            for i in &instances {
                let text = |k: &str| i.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                let version = i.get("version").and_then(Value::as_i64).unwrap_or(1);
                match self.fetch_one(&e.entity, &text("series"), &text("sop"), version).await {
                    Ok(n) => result = result.map(|t| t + n),
                    Err(err) => {
                        result = Err(err);
                        break;
                    }
                }
            }
            match result {
                Ok(bytes) => {
                    let _: Affected = self
                        .internal
                        .post(
                            "/v1/outbox/ack",
                            &AckRequest {
                                kind: "recall".into(),
                                items: vec![AckItem {
                                    seq: e.seq,
                                    pushed_version: None,
                                    upstream_version: None,
                                }],
                            },
                        )
                        .await?;
                    ChannelStats::add(&self.stats.received, instances.len() as u64);
                    tracing::info!(study = %e.entity, instances = instances.len(), bytes, "study recalled from the PACS");
                }
                Err(err) => {
                    let park = e.attempts + 1 >= MAX_ATTEMPTS;
                    tracing::warn!(study = %e.entity, error = %err, park, "recall failed");
                    let _: Affected = self
                        .internal
                        .post(
                            "/v1/outbox/fail",
                            &FailRequest {
                                kind: "recall".into(),
                                items: vec![FailItem {
                                    seq: e.seq,
                                    error: err.to_string(),
                                    park,
                                    retry_after_secs: RETRY_SECS,
                                }],
                            },
                        )
                        .await?;
                    if park {
                        ChannelStats::add(&self.stats.parked, 1);
                    }
                    first_error = first_error.or(Some(err));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(true),
        }
    }

    /// One instance: WADO-RS from the PACS, then to hms-edged, which checks it. Returns its size.
    async fn fetch_one(
        &self,
        study: &str,
        series: &str,
        sop: &str,
        version: i64,
    ) -> Result<u64, RoundError> {
        let url = format!("{}/studies/{study}/series/{series}/instances/{sop}", self.base);
        let resp = self
            .http
            .get(&url)
            .header("accept", "multipart/related; type=\"application/dicom\"; transfer-syntax=*")
            .send()
            .await
            .map_err(|e| UpstreamError::Link(format!("WADO-RS {sop}: {}", without_url(&e))))?;
        let status = resp.status();
        if !status.is_success() {
            let message = format!("the PACS answered {status} for instance {sop}");
            return Err(if status.is_server_error() {
                UpstreamError::Link(message).into()
            } else {
                UpstreamError::Refused { status, message }.into()
            });
        }
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = resp
            .bytes()
            .await
            .map_err(|e| UpstreamError::Link(format!("WADO-RS {sop}: {}", without_url(&e))))?;
        let part10 = first_part(&ct, &body)
            .map_err(|m| UpstreamError::Malformed(format!("WADO-RS {sop}: {m}")))?;
        let n = part10.len() as u64;
        let resp = self
            .internal
            .send(
                hyper::Method::POST,
                &format!("/v1/dicom/recall/{sop}?version={version}"),
                Some(part10.to_vec()),
            )
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let message = String::from_utf8_lossy(&bytes).into_owned();
            // 409: already back (another recall won); nothing to do.
            if status == hyper::StatusCode::CONFLICT {
                return Ok(0);
            }
            return Err(UpstreamError::Refused {
                status: reqwest::StatusCode::from_u16(status.as_u16())
                    .unwrap_or(reqwest::StatusCode::BAD_GATEWAY),
                message: format!("hms-edged refused the recalled instance {sop}: {message}"),
            }
            .into());
        }
        ChannelStats::add(&self.stats.bytes_sent, 0);
        Ok(n)
    }
}

/// The first part of a `multipart/related` answer (or the body itself if it is a plain
/// `application/dicom`).
fn first_part(content_type: &str, body: &Bytes) -> Result<Bytes, String> {
    let mt = MediaType::parse(content_type);
    if mt.essence == "application/dicom" {
        return Ok(body.clone());
    }
    let boundary = mt.param("boundary").ok_or("no multipart boundary")?;
    let mut p = Parser::new(boundary).map_err(|e| e.to_string())?;
    let mut part = Vec::new();
    let mut in_first = false;
    for ev in p.feed(body).map_err(|e| e.to_string())? {
        match ev {
            Event::Part(_) if part.is_empty() && !in_first => in_first = true,
            Event::Data(d) if in_first => part.extend_from_slice(&d),
            Event::PartEnd if in_first => return Ok(Bytes::from(part)),
            _ => {}
        }
    }
    Err("no complete part".into())
}
