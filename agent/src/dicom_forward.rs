//! DICOM channel: forward received instances to the cloud PACS by DICOMweb STOW-RS, one study per
//! request, streamed from hms-edged (never a whole study in memory; `Content-Length` is known
//! from the stored sizes), then confirm arrival with QIDO-RS before the change leaves the outbox.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use hms_edge_wire::api::*;
use hms_edge_wire::client::InternalClient;
use http_body_util::BodyExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::channel::{ChannelStats, RoundError};
use crate::upstream::{UpstreamError, without_url};

/// Lease length for one batch of instances (a slow link may take a while per study).
pub const LEASE_SECS: u32 = 900;
/// Retry delay after an instance failed upstream, seconds.
pub const RETRY_SECS: u32 = 60;
/// Requests to the PACS in flight at once.
pub const IN_FLIGHT: usize = 4;
/// Failed attempts before an instance is parked for site IT.
pub const MAX_ATTEMPTS: i64 = 8;

#[derive(Debug, Clone)]
struct Instance {
    seq: i64,
    sop: String,
    size: u64,
    attempts: i64,
    sop_class: String,
    transfer_syntax: String,
}

/// What sending one chunk came to.
#[derive(Debug)]
enum Sent {
    /// Already failed or parked in the outbox (nothing to check).
    Handled,
    /// The PACS said it stored these (still to be checked when `verify`).
    Accepted(HashSet<String>),
}

/// How instances reach the PACS.
#[derive(Debug)]
pub enum Transport {
    /// STOW-RS, checked with QIDO-RS.
    DicomWeb,
    /// C-STORE SCU, checked with C-FIND.
    CStore(crate::cstore::DicomPacs),
}

/// The DICOM forwarding channel.
#[derive(Debug)]
pub struct DicomForward {
    pub transport: Transport,
    pub http: reqwest::Client,
    /// DICOMweb base, without a trailing slash.
    pub base: String,
    pub batch: u32,
    pub verify: bool,
    pub internal: InternalClient,
    pub stats: Arc<ChannelStats>,
}

impl DicomForward {
    /// Forwards everything due. `Ok(true)`: more is waiting.
    pub async fn round(&self) -> Result<bool, RoundError> {
        let lease: LeaseResponse = self
            .internal
            .post(
                "/v1/outbox/lease",
                &LeaseRequest {
                    kind: "dicom".into(),
                    max: self.batch * IN_FLIGHT as u32 * 2,
                    lease_secs: LEASE_SECS,
                },
            )
            .await?;
        if lease.entries.is_empty() {
            return Ok(false);
        }
        let mut studies: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        let mut unusable = Vec::new();
        for e in lease.entries {
            let d = e.detail.clone().unwrap_or(Value::Null);
            let (Some(study), Some(size)) =
                (d.get("study").and_then(Value::as_str), d.get("size").and_then(Value::as_u64))
            else {
                unusable.push(e.seq);
                continue;
            };
            let text = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            studies.entry(study.to_owned()).or_default().push(Instance {
                seq: e.seq,
                sop: e.entity.clone(),
                size,
                attempts: e.attempts,
                sop_class: text("sop_class"),
                transfer_syntax: text("transfer_syntax"),
            });
        }
        if !unusable.is_empty() {
            self.fail(&unusable, "change without study/series/size detail", true).await?;
        }
        // Several requests in flight (order does not matter between instances): the PACS's
        // ingest, not our round trips, sets the pace. Then one check per study.
        use futures_util::StreamExt;
        let chunks: Vec<(String, Vec<Instance>)> = studies
            .iter()
            .flat_map(|(study, instances)| {
                instances.chunks(self.batch as usize).map(move |c| (study.clone(), c.to_vec()))
            })
            .collect();
        let sent_chunks: Vec<(String, Vec<Instance>, Result<Sent, RoundError>)> =
            futures_util::stream::iter(chunks)
                .map(|(study, chunk)| async move {
                    let r = self.send(&study, &chunk).await;
                    (study, chunk, r)
                })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await;
        let to_verify: BTreeMap<String, ()> = sent_chunks
            .iter()
            .filter(|(_, _, r)| matches!(r, Ok(Sent::Accepted(_))))
            .map(|(s, _, _)| (s.clone(), ()))
            .collect();
        let verified: BTreeMap<String, Result<HashSet<String>, String>> = if self.verify {
            futures_util::stream::iter(to_verify.into_keys())
                .map(|study| async move {
                    let r = self.present(&study).await;
                    (study, r)
                })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await
        } else {
            BTreeMap::new()
        };
        let mut sent = 0;
        let mut first_error: Option<RoundError> = None;
        for (study, chunk, r) in sent_chunks {
            match r {
                Err(e) => first_error = first_error.or(Some(e)),
                Ok(Sent::Handled) => {}
                Ok(Sent::Accepted(accepted)) => {
                    let present = match verified.get(&study) {
                        None => accepted,
                        Some(Ok(p)) => p.clone(),
                        Some(Err(e)) => {
                            let seqs: Vec<i64> = chunk.iter().map(|i| i.seq).collect();
                            self.fail(&seqs, e, false).await?;
                            first_error =
                                first_error.or(Some(UpstreamError::Link(e.clone()).into()));
                            continue;
                        }
                    };
                    sent += self.settle(&chunk, &present, self.how()).await?;
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        crate::events::record(
            &self.internal,
            "sync.progress",
            json!({ "channel": "dicom", "forwarded": sent }),
        )
        .await;
        Ok(true)
    }

    async fn fail(&self, seqs: &[i64], error: &str, park: bool) -> Result<(), RoundError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let items = seqs
            .iter()
            .map(|s| FailItem { seq: *s, error: error.into(), park, retry_after_secs: RETRY_SECS })
            .collect();
        let _: Affected = self
            .internal
            .post("/v1/outbox/fail", &FailRequest { kind: "dicom".into(), items })
            .await?;
        Ok(())
    }

    async fn send(&self, study: &str, chunk: &[Instance]) -> Result<Sent, RoundError> {
        match &self.transport {
            Transport::DicomWeb => self.stow(study, chunk).await,
            Transport::CStore(pacs) => self.cstore(pacs, chunk).await,
        }
    }

    fn how(&self) -> &'static str {
        match self.transport {
            Transport::DicomWeb => "STOW-RS",
            Transport::CStore(_) => "C-STORE",
        }
    }

    /// SOP Instance UIDs the PACS holds for a study (QIDO-RS or C-FIND).
    async fn present(&self, study: &str) -> Result<HashSet<String>, String> {
        match &self.transport {
            Transport::DicomWeb => self.qido_instances(study).await.map_err(|e| e.to_string()),
            Transport::CStore(pacs) => crate::cstore::find_instances(pacs, study).await,
        }
    }

    /// Sends instances of one study over one association; acknowledges the confirmed ones.
    async fn cstore(
        &self,
        pacs: &crate::cstore::DicomPacs,
        chunk: &[Instance],
    ) -> Result<Sent, RoundError> {
        let seqs: Vec<i64> = chunk.iter().map(|i| i.seq).collect();
        let items = chunk
            .iter()
            .map(|i| crate::cstore::ToSend {
                sop: i.sop.clone(),
                sop_class: i.sop_class.clone(),
                transfer_syntax: i.transfer_syntax.clone(),
            })
            .collect();
        let results = match crate::cstore::store(pacs, &self.internal, items).await {
            Ok(r) => r,
            Err(e) => {
                self.fail(&seqs, &e, false).await?;
                return Err(UpstreamError::Link(format!("C-STORE to the PACS: {e}")).into());
            }
        };
        let stored: HashSet<String> = results
            .iter()
            .filter(|(_, r)| matches!(r, Ok(s) if *s == 0 || (0xB000..=0xBFFF).contains(s)))
            .map(|(sop, _)| sop.clone())
            .collect();
        for (sop, r) in &results {
            if !stored.contains(sop) {
                tracing::warn!(%sop, result = ?r, "the PACS did not store an instance");
            }
        }
        ChannelStats::add(&self.stats.bytes_sent, chunk.iter().map(|i| i.size).sum());
        Ok(Sent::Accepted(stored))
    }

    /// Acknowledges the instances the PACS confirmed; the others are retried or parked.
    async fn settle(
        &self,
        chunk: &[Instance],
        present: &HashSet<String>,
        how: &str,
    ) -> Result<u64, RoundError> {
        let mut ack = Vec::new();
        let mut retry = Vec::new();
        let mut park = Vec::new();
        for i in chunk {
            if present.contains(&i.sop) {
                ack.push(AckItem { seq: i.seq, pushed_version: None, upstream_version: None });
            } else if i.attempts + 1 >= MAX_ATTEMPTS {
                park.push(i.seq);
            } else {
                retry.push(i.seq);
            }
        }
        let n = ack.len() as u64;
        if !ack.is_empty() {
            let _: Affected = self
                .internal
                .post("/v1/outbox/ack", &AckRequest { kind: "dicom".into(), items: ack })
                .await?;
        }
        let why = format!("not confirmed by the PACS after {how}");
        self.fail(&retry, &why, false).await?;
        self.fail(&park, &why, true).await?;
        ChannelStats::add(&self.stats.parked, park.len() as u64);
        ChannelStats::add(&self.stats.sent, n);
        Ok(n)
    }

    /// Sends one STOW-RS request for instances of one study; acknowledges the confirmed ones.
    async fn stow(&self, study: &str, chunk: &[Instance]) -> Result<Sent, RoundError> {
        let boundary = format!("hms-edge-{:016x}", rand::random::<u64>());
        let part_head = "\r\nContent-Type: application/dicom\r\n\r\n";
        let mut length = 0u64;
        for i in chunk {
            length += (2 + boundary.len() + part_head.len()) as u64 + i.size + 2;
        }
        length += (2 + boundary.len() + 4) as u64;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
        let internal = self.internal.clone();
        let parts: Vec<(String, u64)> = chunk.iter().map(|i| (i.sop.clone(), i.size)).collect();
        let b = boundary.clone();
        let producer = tokio::spawn(async move {
            let result: Result<(), String> = async {
                for (sop, size) in parts {
                    let head = format!("--{b}{part_head}");
                    tx.send(Ok(Bytes::from(head))).await.map_err(|_| "receiver gone")?;
                    let resp = internal
                        .send(hyper::Method::GET, &format!("/v1/dicom/instances/{sop}"), None)
                        .await
                        .map_err(|e| e.to_string())?;
                    if !resp.status().is_success() {
                        return Err(format!(
                            "hms-edged answered {} for instance {sop}",
                            resp.status()
                        ));
                    }
                    let mut body = resp.into_body();
                    let mut got = 0u64;
                    while let Some(frame) = body.frame().await {
                        let frame = frame.map_err(|e| e.to_string())?;
                        if let Ok(data) = frame.into_data() {
                            got += data.len() as u64;
                            tx.send(Ok(data)).await.map_err(|_| "receiver gone")?;
                        }
                    }
                    if got != size {
                        return Err(format!("instance {sop}: {got} bytes read, {size} expected"));
                    }
                    tx.send(Ok(Bytes::from_static(b"\r\n"))).await.map_err(|_| "receiver gone")?;
                }
                tx.send(Ok(Bytes::from(format!("--{b}--\r\n"))))
                    .await
                    .map_err(|_| "receiver gone")?;
                Ok(())
            }
            .await;
            if let Err(e) = &result {
                // Ends the request body with an error: the PACS sees an aborted upload.
                let _ = tx.send(Err(std::io::Error::other(e.clone()))).await;
            }
            result
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let seqs: Vec<i64> = chunk.iter().map(|i| i.seq).collect();
        let resp = self
            .http
            .post(format!("{}/studies/{study}", self.base))
            .header(
                "content-type",
                format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
            )
            .header("accept", "application/dicom+json")
            .header("content-length", length)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await;
        let produced = producer.await.unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = produced {
            if e.contains("hms-edged answered 404") {
                // The instance is gone from the edge: nothing to forward, ever. Park, report.
                self.fail(&seqs, &e, true).await?;
                ChannelStats::add(&self.stats.parked, seqs.len() as u64);
                return Ok(Sent::Handled);
            }
            self.fail(&seqs, &e, false).await?;
            return Err(
                UpstreamError::Link(format!("reading instances from hms-edged: {e}")).into()
            );
        }
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let msg = without_url(&e);
                self.fail(&seqs, &msg, false).await?;
                return Err(UpstreamError::Link(msg).into());
            }
        };
        let status = resp.status();
        if status.is_server_error()
            || status == StatusCode::UNAUTHORIZED
            || status == StatusCode::FORBIDDEN
        {
            let msg = format!("PACS answered {status}");
            self.fail(&seqs, &msg, false).await?;
            return Err(UpstreamError::Link(msg).into());
        }
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        ChannelStats::add(&self.stats.bytes_sent, length);
        let mut failed: HashSet<String> = HashSet::new();
        if let Some(items) = answer.pointer("/00081198/Value").and_then(Value::as_array) {
            for it in items {
                if let Some(uid) = it.pointer("/00081155/Value/0").and_then(Value::as_str) {
                    failed.insert(uid.to_owned());
                }
            }
        }
        let accepted: HashSet<String> = if status.is_success() {
            chunk.iter().map(|i| i.sop.clone()).filter(|s| !failed.contains(s)).collect()
        } else {
            HashSet::new()
        };
        Ok(Sent::Accepted(accepted))
    }

    /// SOP Instance UIDs the PACS holds for a study (QIDO-RS).
    async fn qido_instances(&self, study: &str) -> Result<HashSet<String>, UpstreamError> {
        let resp = self
            .http
            .get(format!("{}/studies/{study}/instances", self.base))
            .header("accept", "application/dicom+json")
            .send()
            .await
            .map_err(|e| UpstreamError::Link(without_url(&e)))?;
        let status = resp.status();
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_FOUND {
            return Ok(HashSet::new());
        }
        if !status.is_success() {
            return Err(UpstreamError::Link(format!("QIDO-RS answered {status}")));
        }
        let v: Value = resp.json().await.map_err(|e| UpstreamError::Malformed(without_url(&e)))?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i.pointer("/00080018/Value/0").and_then(Value::as_str))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default())
    }
}
