//! Recall: a retrieve (C-GET, C-MOVE, WADO-RS) that names evicted instances asks the agent to
//! fetch them back from the cloud PACS, waits for them (C-GET and C-MOVE send pending responses
//! meanwhile), then serves them; prefetch asks the same for the evicted priors of a scheduled
//! order's patient.
//!
//! The request is an outbox change of kind `recall` per study (an open one is reused), listing
//! its evicted instance versions; the agent leases it, fetches each instance by WADO-RS and hands
//! it to [`accept`] through the internal API. [`accept`] takes only the data set received first:
//! the blob is rebuilt under its old id with the File Meta it began with
//! (`dicom_offloaded_file_meta`), so its size and the data set's SHA-256 must both equal what was
//! recorded at the first receipt, and every row, the ledger leaf included, keeps its meaning.
//! Anything else is refused and leaves nothing behind.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;

use super::index;
use crate::store::{Change, Store, StoreError};

/// The outbox kind of recall requests (the agent's `recall` channel).
pub const RECALL_KIND: &str = "recall";

/// Asks the agent to bring back the evicted instances of `studies`: one change per study with
/// something evicted, unless one is still open. Returns how many were asked for.
pub async fn request(store: &Arc<Store>, studies: Vec<String>) -> Result<usize, StoreError> {
    store
        .write(move |tx| {
            let mut asked = 0;
            for study in &studies {
                if crate::sync::outbox::has_pending(tx.sql(), RECALL_KIND, study)? {
                    continue;
                }
                let evicted = index::evicted_of_study(tx.sql(), study)?;
                if evicted.is_empty() {
                    continue;
                }
                tx.append_change(&Change {
                    kind: RECALL_KIND.into(),
                    entity: study.clone(),
                    op: "recall".into(),
                    version: None,
                    detail: Some(json!({ "study": study, "instances": evicted }).to_string()),
                })?;
                asked += 1;
            }
            Ok(asked)
        })
        .await
}

/// Where a wait for recalled instances stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Instances still not held here.
    pub missing: usize,
    /// The agent's last error on one of the recalls (a WAN down, the PACS without the study).
    pub failure: Option<String>,
}

/// One look at a recall: which of `blobs` are back, and whether the recall of one of `studies`
/// failed.
pub async fn progress(
    store: &Arc<Store>,
    blobs: Vec<String>,
    studies: Vec<String>,
) -> Result<Progress, StoreError> {
    store
        .read(move |c| {
            let held = index::held_among(c, &blobs)?;
            let mut failure = None;
            for s in &studies {
                if let Some(e) = crate::sync::outbox::pending_failure(c, RECALL_KIND, s)? {
                    failure = Some(e);
                    break;
                }
            }
            Ok(Progress { missing: blobs.len() - held.len(), failure })
        })
        .await
}

/// Why a recalled instance was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecallError {
    #[error("instance {0} version {1} is not evicted here (unknown, or already held)")]
    NotEvicted(String, i64),
    #[error("the recalled instance differs from the one received: {0}")]
    Mismatch(String),
    #[error("the recalled instance could not be read: {0}")]
    Body(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Stores a recalled instance: `body` is the Part 10 file the cloud PACS returned. Its data set
/// goes behind the File Meta the evicted blob began with, under the blob's own id; the result
/// must have the recorded size and data set SHA-256, else nothing is kept. Audited as
/// `dicom-recall`. Returns the bytes stored.
pub async fn accept(
    store: &Arc<Store>,
    sop: &str,
    version: i64,
    actor: &str,
    mut body: impl futures_util::Stream<Item = Result<Bytes, String>> + Unpin,
) -> Result<u64, RecallError> {
    use futures_util::StreamExt;
    let (s, v) = (sop.to_owned(), version);
    let Some(ev) = store.read(move |c| index::evicted_instance(c, &s, v)).await? else {
        return Err(RecallError::NotEvicted(sop.to_owned(), version));
    };
    // Removals still pending from the eviction are done first, and none may run until the
    // file is back and marked held.
    let _offloads = store.lock_offloads().await;
    store.finish_offloads_locked().await?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(8);
    let blobs = store.blobs().clone();
    let (id, file_meta) = (ev.blob.clone(), ev.file_meta.clone());
    let writer = tokio::task::spawn_blocking(move || -> Result<_, RecallError> {
        use std::io::Write;
        let mut head: Vec<u8> = Vec::new();
        let mut w: Option<crate::store::BlobWriter> = None;
        for chunk in rx {
            match &mut w {
                Some(w) => w.write_all(&chunk)?,
                None => {
                    head.extend_from_slice(&chunk);
                    if let Some(off) = super::dataset::part10_dataset_offset(&head) {
                        if head.len() >= off {
                            let mut nw = blobs.create_as(&id, &file_meta)?;
                            nw.write_all(&head[off..])?;
                            w = Some(nw);
                        }
                    } else if head.len() > 1 << 20 {
                        return Err(RecallError::Body("no Part 10 File Meta".into()));
                    }
                }
            }
        }
        w.ok_or_else(|| RecallError::Body("no data set".into()))
    });
    let mut sent = Ok(());
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(b) => {
                if tx.send(b).is_err() {
                    break; // the writer stopped: its error says why
                }
            }
            Err(e) => {
                sent = Err(RecallError::Body(e));
                break;
            }
        }
    }
    drop(tx);
    let w = writer.await.map_err(|_| StoreError::Panicked)??;
    sent?;
    if w.sha256_so_far() != ev.dataset_sha256 {
        return Err(RecallError::Mismatch("the data set's SHA-256 differs".into()));
    }
    if w.len() != ev.size {
        return Err(RecallError::Mismatch(format!("{} bytes instead of {}", w.len(), ev.size)));
    }
    let meta = tokio::task::spawn_blocking(move || w.finish())
        .await
        .map_err(|_| StoreError::Panicked)??;
    let (sop2, actor, study, size) =
        (sop.to_owned(), actor.to_owned(), ev.study_uid.clone(), meta.size);
    store
        .write(move |tx| {
            tx.restore_blob(&meta.id)?;
            // Recalled for a reader: the protection window starts again, so the next eviction
            // round does not take it straight back.
            index::mark_accessed(tx.sql(), &[(study.clone(), crate::store::now_ms())])?;
            crate::audit::append(
                tx,
                &crate::audit::AuditRecord {
                    actor,
                    source: "internal-api".into(),
                    action: "dicom-recall".into(),
                    entity: format!("dicom:{sop2}"),
                    outcome: "success".into(),
                    detail: Some(
                        json!({ "study": study, "version": version, "bytes": size }).to_string(),
                    ),
                },
            )?;
            Ok(())
        })
        .await?;
    metrics::counter!("hms_dicom_recalled_instances_total").increment(1);
    metrics::counter!("hms_dicom_recalled_bytes_total").increment(size);
    Ok(size)
}

/// Prefetch: for each active order on the worklist scheduled within `storage.prefetch_lead_secs`
/// (from an hour ago), asks for the evicted studies of its patient from the last
/// `storage.prefetch_lookback_days` — so the radiologist has the priors even if the WAN drops
/// before the exam. Returns how many recalls were asked for.
pub async fn prefetch_round(
    store: &Arc<Store>,
    config: &crate::config::Config,
) -> Result<usize, StoreError> {
    let lead_ms = (config.storage.prefetch_lead_secs as i64).saturating_mul(1000);
    if lead_ms == 0 {
        return Ok(0);
    }
    let now = crate::store::now_ms();
    let since_ms = now - (config.storage.prefetch_lookback_days as i64).saturating_mul(86_400_000);
    let since: String = crate::fhir::date::format_instant(since_ms)[..10].replace('-', "");
    let system = config.site.patient_id_system.clone();
    let studies = store
        .read(move |c| {
            use hms_edge_dicom::worklist::is_scheduled;
            const PATIENT_ID: u32 = 0x0010_0020;
            let mut out = std::collections::BTreeSet::new();
            for sr in
                crate::fhir::storage::active_service_requests(c)?.iter().filter(|s| is_scheduled(s))
            {
                let Some(when) = scheduled_ms(c, sr)? else { continue };
                if when < now - 3_600_000 || when > now + lead_ms {
                    continue;
                }
                let item = super::worklist::item_for(c, sr, &system)?;
                let Some(pid) =
                    item.top.get(&PATIENT_ID).map(|p| p.trim()).filter(|p| !p.is_empty())
                else {
                    continue;
                };
                out.extend(index::evicted_studies_of_patient(c, pid, &since)?);
            }
            Ok(out)
        })
        .await?;
    if studies.is_empty() {
        return Ok(0);
    }
    let asked = request(store, studies.into_iter().collect()).await?;
    if asked > 0 {
        tracing::info!(
            studies = asked,
            "prefetch: evicted priors of scheduled orders asked back from the cloud PACS"
        );
        metrics::counter!("hms_dicom_prefetch_requests_total").increment(asked as u64);
    }
    Ok(asked)
}

/// When an order is scheduled: its Appointment's start, else its own occurrence.
fn scheduled_ms(
    c: &rusqlite::Connection,
    sr: &serde_json::Value,
) -> Result<Option<i64>, StoreError> {
    use serde_json::Value;
    let id = sr.get("id").and_then(Value::as_str).unwrap_or("");
    let appointment = match crate::fhir::storage::appointment_based_on(c, id)? {
        Some(a) => crate::fhir::storage::read_current_json(c, "Appointment", &a)?,
        None => None,
    };
    let text = appointment
        .as_ref()
        .and_then(|a| a.get("start").and_then(Value::as_str))
        .or_else(|| sr.get("occurrenceDateTime").and_then(Value::as_str))
        .or_else(|| sr.pointer("/occurrencePeriod/start").and_then(Value::as_str));
    Ok(text.and_then(crate::fhir::date::parse_range).map(|(lo, _)| lo))
}
