//! Eviction: when the state file system is above its high watermark, the encrypted files of
//! studies the cloud PACS holds go, least recently used first, until the low watermark is reached.
//!
//! What may go (checked again inside the evicting transaction, [`index::offload_study`]): a study
//! with something held here whose every instance version the cloud PACS confirmed (the agent's
//! QIDO-RS/C-FIND check acknowledged its outbox change), not pinned by site IT, not received or
//! retrieved within `storage.protect_secs`, and not named by an active worklist order (accession
//! number or Study Instance UID). The index rows stay: C-FIND and QIDO-RS still find the study.
//!
//! Crash safety: one transaction marks the study's blobs offloaded, queues their files for
//! removal, appends the audit record and the `study.evicted` event; the files are removed only
//! after it is durable ([`crate::store::Store::finish_offloads`]; a crash in between is finished
//! at the next open). So no row ever counts as held a file that is gone, and no file outlives
//! the commit by more than a restart.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::index::{self, StudyUse};
use crate::config::Config;
use crate::store::space::{Pressure, SpacePolicy};
use crate::store::{Change, Store, StoreError, now_ms};

/// Studies looked at per round of the eviction task (the least recently used first).
pub const CANDIDATES_PER_ROUND: usize = 200;

/// Retrieves of studies not yet written to the index (`dicom_studies.accessed_at`): one write per
/// round of the eviction task instead of one per WADO-RS request.
#[derive(Debug, Default)]
pub struct AccessLog {
    seen: Mutex<HashMap<String, i64>>,
}

impl AccessLog {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Notes that studies were retrieved now.
    pub fn touch<'a>(&self, studies: impl IntoIterator<Item = &'a str>) {
        let now = now_ms();
        let mut seen = self.seen.lock().expect("access log lock");
        for s in studies {
            seen.insert(s.to_owned(), now);
        }
    }

    /// Writes what was noted to the index.
    pub async fn flush(&self, store: &Store) -> Result<(), StoreError> {
        let batch: Vec<(String, i64)> =
            std::mem::take(&mut *self.seen.lock().expect("access log lock")).into_iter().collect();
        if batch.is_empty() {
            return Ok(());
        }
        store.write(move |tx| index::mark_accessed(tx.sql(), &batch)).await
    }
}

/// Why a study stays (a manual request's answer, per study).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kept {
    Pinned,
    /// Some instance is not confirmed by the cloud PACS yet: evicting it would lose it.
    NotConfirmedUpstream,
    /// An active worklist order names it.
    ActiveOrder,
    /// Nothing of it is held here any more.
    AlreadyEvicted,
    /// Changed between the choice and the transaction (a new instance, a pin).
    Changed,
}

/// One study of an eviction (done, or what a dry run would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StudyEviction {
    pub study_uid: String,
    pub instances: u64,
    pub bytes: u64,
    pub last_use_ms: i64,
    /// `None`: evicted (or would be, in a dry run).
    pub kept: Option<Kept>,
}

/// What an eviction did (or would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictReport {
    pub dry_run: bool,
    pub studies: Vec<StudyEviction>,
    /// Bytes freed (or that would be), and studies evicted.
    pub bytes: u64,
    pub evicted: u64,
}

/// Who asked, for the audit record.
#[derive(Debug, Clone)]
pub struct Requester {
    pub actor: String,
    pub source: String,
    /// `watermark` (the task) or `manual`.
    pub reason: &'static str,
}

/// Keys of the active worklist orders: accession numbers and Study Instance UIDs.
fn active_order_keys(
    conn: &rusqlite::Connection,
    patient_id_system: &str,
) -> Result<BTreeSet<String>, StoreError> {
    use hms_edge_dicom::worklist::{Item, is_scheduled};
    const ACCESSION_NUMBER: u32 = 0x0008_0050;
    const STUDY_INSTANCE_UID: u32 = 0x0020_000D;
    let mut keys = BTreeSet::new();
    for sr in
        crate::fhir::storage::active_service_requests(conn)?.iter().filter(|s| is_scheduled(s))
    {
        let item: Item = super::worklist::item_for(conn, sr, patient_id_system)?;
        for tag in [ACCESSION_NUMBER, STUDY_INSTANCE_UID] {
            if let Some(v) = item.top.get(&tag).filter(|v| !v.trim().is_empty()) {
                keys.insert(v.trim().to_owned());
            }
        }
    }
    Ok(keys)
}

fn ordered(u: &StudyUse, orders: &BTreeSet<String>) -> bool {
    orders.contains(u.study_uid.as_str())
        || (!u.accession_number.trim().is_empty() && orders.contains(u.accession_number.trim()))
}

/// Evicts one study in one durable transaction, then removes its files. `Ok(None)`: it was
/// evicted; `Ok(Some(why))`: it stays.
pub async fn evict_study(
    store: &Arc<Store>,
    study_uid: &str,
    who: &Requester,
) -> Result<(Option<Kept>, StudyUse), StoreError> {
    // The File Meta each blob begins with, kept so that a recall rebuilds the same blob.
    let uid = study_uid.to_owned();
    let blobs = store.read(move |c| index::held_blobs_of_study(c, &uid)).await?;
    let file_metas = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || read_file_metas(&store, &blobs))
            .await
            .map_err(|_| StoreError::Panicked)??
    };
    let uid = study_uid.to_owned();
    let who2 = who.clone();
    let done = store
        .write(move |tx| {
            let Some(before) = index::offload_study(tx, &uid, &file_metas)? else {
                return Ok(None);
            };
            let detail = serde_json::json!({
                "study": uid,
                "instances": before.held_instances,
                "bytes": before.held_bytes,
                "reason": who2.reason,
            });
            crate::audit::append(
                tx,
                &crate::audit::AuditRecord {
                    actor: who2.actor.clone(),
                    source: who2.source.clone(),
                    action: "dicom-evict".into(),
                    entity: format!("dicom-study:{uid}"),
                    outcome: "success".into(),
                    detail: Some(detail.to_string()),
                },
            )?;
            // A PHI-free event for the broker: the agent publishes it as `study.evicted`.
            tx.append_change(&Change {
                kind: "event".into(),
                entity: uid.clone(),
                op: "study.evicted".into(),
                version: None,
                detail: Some(detail.to_string()),
            })?;
            Ok(Some(before))
        })
        .await?;
    let Some(before) = done else {
        let now = store.read({
            let uid = study_uid.to_owned();
            move |c| index::study_use_of(c, &uid)
        });
        let why = match now.await? {
            Some(u) if u.pinned => Kept::Pinned,
            Some(u) if u.unconfirmed > 0 => Kept::NotConfirmedUpstream,
            Some(u) if u.held_instances == 0 => Kept::AlreadyEvicted,
            _ => Kept::Changed,
        };
        let u = StudyUse {
            study_uid: study_uid.to_owned(),
            accession_number: String::new(),
            last_use_ms: 0,
            held_instances: 0,
            held_bytes: 0,
            unconfirmed: 0,
            pinned: why == Kept::Pinned,
        };
        return Ok((Some(why), u));
    };
    store.finish_offloads().await?;
    metrics::counter!("hms_dicom_evicted_studies_total", "reason" => who.reason).increment(1);
    metrics::counter!("hms_dicom_evicted_bytes_total").increment(before.held_bytes);
    tracing::info!(study = %study_uid, instances = before.held_instances, bytes = before.held_bytes,
        reason = who.reason, "study evicted (the cloud PACS holds it)");
    Ok((None, before))
}

/// The File Meta (our Part 10 header) at the start of each blob: the first chunk is decrypted
/// and authenticated, nothing more.
fn read_file_metas(
    store: &Store,
    blobs: &[String],
) -> Result<HashMap<String, Vec<u8>>, StoreError> {
    use std::io::Read;
    let mut out = HashMap::with_capacity(blobs.len());
    for b in blobs {
        let Some(id) = crate::store::BlobId::parse(b) else { continue };
        let mut r = store.blobs().open_reader(&id)?;
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 4096];
        let off = loop {
            if let Some(off) = super::dataset::part10_dataset_offset(&head) {
                break off;
            }
            let n = r.read(&mut buf)?;
            if n == 0 || head.len() > 64 * 1024 {
                return Err(StoreError::Rejected(format!("blob {b} has no readable File Meta")));
            }
            head.extend_from_slice(&buf[..n]);
        };
        head.truncate(off);
        out.insert(b.clone(), head);
    }
    Ok(out)
}

/// Why `u` may not go by hand (the protection window does not apply to site IT's request).
fn kept_by_hand(u: &StudyUse, orders: &BTreeSet<String>) -> Option<Kept> {
    if u.held_instances == 0 {
        Some(Kept::AlreadyEvicted)
    } else if u.pinned {
        Some(Kept::Pinned)
    } else if u.unconfirmed > 0 {
        Some(Kept::NotConfirmedUpstream)
    } else if ordered(u, orders) {
        Some(Kept::ActiveOrder)
    } else {
        None
    }
}

/// What site IT asked for: one study, or every study last used before a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictRequest {
    pub study: Option<String>,
    /// Milliseconds since the epoch.
    pub before_ms: Option<i64>,
    pub dry_run: bool,
}

/// Manual eviction (`hms-edge dicom evict`). Unknown study: `Ok(None)`.
pub async fn evict_by_hand(
    store: &Arc<Store>,
    req: &EvictRequest,
    patient_id_system: &str,
    who: &Requester,
) -> Result<Option<EvictReport>, StoreError> {
    let (study, before, system) = (req.study.clone(), req.before_ms, patient_id_system.to_owned());
    let (chosen, orders) = store
        .read(move |c| {
            let chosen = match (&study, before) {
                (Some(s), _) => index::study_use_of(c, s)?.into_iter().collect::<Vec<_>>(),
                (None, Some(t)) => index::studies_used_before(c, t)?,
                (None, None) => Vec::new(),
            };
            Ok((chosen, active_order_keys(c, &system)?))
        })
        .await?;
    if req.study.is_some() && chosen.is_empty() {
        return Ok(None);
    }
    let mut report = EvictReport { dry_run: req.dry_run, ..Default::default() };
    for u in chosen {
        let mut kept = kept_by_hand(&u, &orders);
        if kept.is_none() && !req.dry_run {
            kept = evict_study(store, &u.study_uid, who).await?.0;
        }
        if kept.is_none() {
            report.bytes += u.held_bytes;
            report.evicted += 1;
        }
        report.studies.push(StudyEviction {
            study_uid: u.study_uid,
            instances: u.held_instances,
            bytes: u.held_bytes,
            last_use_ms: u.last_use_ms,
            kept,
        });
    }
    Ok(Some(report))
}

/// One round of the watermark policy: if the file system is above the high watermark, evict
/// candidates until the low watermark is reached or none is left. Returns the report.
pub async fn watermark_round(
    store: &Arc<Store>,
    config: &Config,
) -> Result<EvictReport, StoreError> {
    let policy: SpacePolicy = store.space().policy();
    let mut report = EvictReport::default();
    let Ok(space) = store.space().measure() else { return Ok(report) };
    let pressure = policy.pressure(space);
    metrics::gauge!("hms_disk_pressure").set(pressure as u8 as f64);
    if pressure < Pressure::High || !config.storage.eviction {
        return Ok(report);
    }
    let cutoff = now_ms() - (config.storage.protect_secs as i64).saturating_mul(1000);
    let system = config.site.patient_id_system.clone();
    let (candidates, orders) = store
        .read(move |c| {
            Ok((
                index::eviction_candidates(c, cutoff, CANDIDATES_PER_ROUND)?,
                active_order_keys(c, &system)?,
            ))
        })
        .await?;
    let who = Requester { actor: "hms-edged".into(), source: "local".into(), reason: "watermark" };
    for u in candidates.iter().filter(|u| !ordered(u, &orders)) {
        if store.space().measure().is_ok_and(|s| policy.at_or_below_low(s)) {
            break;
        }
        let (kept, before) = evict_study(store, &u.study_uid, &who).await?;
        if kept.is_none() {
            report.bytes += before.held_bytes;
            report.evicted += 1;
        }
        report.studies.push(StudyEviction {
            study_uid: u.study_uid.clone(),
            instances: before.held_instances,
            bytes: before.held_bytes,
            last_use_ms: u.last_use_ms,
            kept,
        });
    }
    if let Ok(s) = store.space().measure()
        && !policy.at_or_below_low(s)
    {
        tracing::warn!(
            free = s.free,
            evicted = report.evicted,
            "the disk stays above the low watermark: no more study may be evicted (unconfirmed \
             upstream, pinned, ordered, or used within storage.protect_secs)"
        );
    }
    Ok(report)
}

/// The eviction task: a round every `storage.check_interval_secs`, and at once when a write
/// finds the disk above the high watermark; retrieves noted in `accessed` are written first,
/// and the prefetch of scheduled orders' priors runs on the same beat.
pub async fn run(
    store: Arc<Store>,
    accessed: Arc<AccessLog>,
    config: tokio::sync::watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
) {
    loop {
        let c = config.borrow().clone();
        let every = Duration::from_secs(c.storage.check_interval_secs.max(1));
        if let Err(e) = accessed.flush(&store).await {
            tracing::warn!(error = %e, "cannot record study retrieves");
        }
        if let Err(e) = super::recall::prefetch_round(&store, &c).await {
            tracing::warn!(error = %e, "prefetch round failed");
        }
        // A round that found the disk full and nothing to evict is not repeated at every write
        // that notices: the next look waits for the interval.
        let fruitless = match watermark_round(&store, &c).await {
            Ok(r) => {
                r.evicted == 0
                    && store
                        .space()
                        .measure()
                        .is_ok_and(|s| store.space().policy().pressure(s) >= Pressure::High)
            }
            Err(e) => {
                tracing::error!(error = %e, "eviction round failed");
                true
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = store.space().pressure_rises(), if !fruitless => {
                // Several writes may notice at once: let them pile into one round.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
