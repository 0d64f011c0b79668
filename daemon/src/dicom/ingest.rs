//! One ingest commit for every way an instance arrives (C-STORE on an association, a STOW-RS
//! part): [`Receiving::start`] streams the data set into an encrypted blob ([`super::sink`]) as it
//! arrives; [`commit`] checks the received instance against what the sender declared, records it
//! with [`index::record_instance`] in one [`Store::write`] (blob row, index rows, ledger leaf,
//! outbox change, ImagingStudy mark, audit event), and removes the blob when no row references it
//! (refused, duplicate, or failed write). Callers keep only their protocol mapping of
//! [`IngestError`] (DIMSE status and Error Comment; STOW-RS Failure Reason).

use bytes::Bytes;
use tracing::warn;

use super::dataset::FileMeta;
use super::index::{self, Recorded, Sender};
use super::sink::{SinkError, SinkHandle};
use super::uids;
use crate::config::DuplicatePolicy;
use crate::store::{BlobId, BlobStore, Store, StoreError};

/// What the sender said the instance is, before its data set arrived.
#[derive(Debug, Clone)]
pub struct Declared {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    /// Source AE Title of the stored File Meta (empty when not received on an association).
    pub source_ae_title: String,
    /// The study the instance must belong to (STOW-RS to `/studies/{study}`).
    pub study_instance_uid: Option<String>,
}

/// How the data set contradicts what was declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    SopInstanceUid,
    SopClassUid,
    StudyOrSeriesMissing,
    /// The instance belongs to this other study.
    OtherStudy(String),
}

impl Mismatch {
    /// The reason in words; `declared_in` names where the sender declared the UIDs ("the
    /// command", "the File Meta").
    pub fn describe(&self, declared_in: &str) -> String {
        match self {
            Mismatch::SopInstanceUid => {
                format!("SOP Instance UID of the data set differs from {declared_in}")
            }
            Mismatch::SopClassUid => {
                format!("SOP Class UID of the data set differs from {declared_in}")
            }
            Mismatch::StudyOrSeriesMissing => "Study or Series Instance UID missing".into(),
            Mismatch::OtherStudy(s) => {
                format!("the instance belongs to study {s}, not the one of the URL")
            }
        }
    }
}

/// Why an instance was not stored. Nothing of it remains: no row, and its blob is removed (or
/// swept at the next start when the outcome of the write is unknown).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The declared transfer syntax is not one we can parse (refused before any byte is stored).
    #[error("transfer syntax {0} is not supported")]
    UnsupportedTransferSyntax(String),
    /// The data set is not well-formed (truncated, bad structure, bad deflate stream).
    #[error("malformed data set: {0}")]
    Malformed(String),
    /// The blob could not be written (disk full, I/O error) or the transfer was abandoned.
    #[error("{0}")]
    Write(SinkError),
    /// The data set contradicts what was declared.
    #[error("{}", .0.describe("what was declared"))]
    Mismatch(Mismatch),
    /// The SOP Instance UID is already stored with other content (keep-first policy).
    #[error("SOP Instance UID already stored with different content")]
    Conflict,
    /// The durable write failed (rolled back, or its outcome unknown when the store closed).
    #[error("cannot store the instance: {0}")]
    Store(StoreError),
}

/// A stored instance.
#[derive(Debug, Clone)]
pub struct Stored {
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub written: Written,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Stored as this version (1 for a new SOP Instance UID).
    New { version: i64, outbox_seq: i64 },
    /// The same SOP Instance UID with identical content was already stored: nothing written.
    Identical,
}

/// An instance whose data set is arriving.
pub struct Receiving {
    sink: SinkHandle,
    declared: Declared,
}

impl Receiving {
    /// Starts the blob (File Meta from `declared`) on a blocking thread.
    pub fn start(blobs: &BlobStore, declared: Declared) -> Result<Receiving, IngestError> {
        let Some(enc) = uids::dataset_encoding(&declared.transfer_syntax) else {
            return Err(IngestError::UnsupportedTransferSyntax(declared.transfer_syntax));
        };
        let meta = FileMeta {
            sop_class_uid: declared.sop_class_uid.clone(),
            sop_instance_uid: declared.sop_instance_uid.clone(),
            transfer_syntax: declared.transfer_syntax.clone(),
            source_ae_title: declared.source_ae_title.clone(),
        };
        Ok(Receiving { sink: SinkHandle::start(blobs.clone(), meta, enc), declared })
    }

    /// Queues data set bytes (waits while the writer is behind).
    pub async fn push(&mut self, data: Bytes) {
        self.sink.push(data).await;
    }

    /// Abandons the transfer: nothing of it remains on disk.
    pub fn abandon(self) {
        self.sink.abandon();
    }
}

/// Ends the data set, checks it against what was declared and records it durably (one
/// [`Store::write`]); returns only once the outcome is durable.
pub async fn commit(
    store: &Store,
    policy: DuplicatePolicy,
    received: Receiving,
    sender: Sender,
) -> Result<Stored, IngestError> {
    let Receiving { sink, declared } = received;
    let inst = match sink.finish().await {
        Ok(i) => i,
        Err(SinkError::Malformed(m)) => return Err(IngestError::Malformed(m)),
        Err(e) => return Err(IngestError::Write(e)),
    };
    let a = &inst.attrs;
    let mismatch = if a.sop_instance_uid != declared.sop_instance_uid {
        Some(Mismatch::SopInstanceUid)
    } else if a.sop_class_uid != declared.sop_class_uid {
        Some(Mismatch::SopClassUid)
    } else if a.study_instance_uid.is_empty() || a.series_instance_uid.is_empty() {
        Some(Mismatch::StudyOrSeriesMissing)
    } else if declared.study_instance_uid.as_ref().is_some_and(|s| *s != a.study_instance_uid) {
        Some(Mismatch::OtherStudy(a.study_instance_uid.clone()))
    } else {
        None
    };
    let blob = inst.blob.id.clone();
    if let Some(m) = mismatch {
        remove_unreferenced_blob(store, blob);
        return Err(IngestError::Mismatch(m));
    }
    let identical = Stored {
        sop_instance_uid: a.sop_instance_uid.clone(),
        study_instance_uid: a.study_instance_uid.clone(),
        series_instance_uid: a.series_instance_uid.clone(),
        written: Written::Identical,
    };
    let ts = declared.transfer_syntax;
    // `record_instance` writes the `dicom-store` audit event in the instance's own transaction.
    let result =
        store.write(move |tx| index::record_instance(tx, &inst, &ts, &sender, policy)).await;
    match result {
        Ok(Recorded::Stored { version, outbox_seq }) => {
            Ok(Stored { written: Written::New { version, outbox_seq }, ..identical })
        }
        Ok(Recorded::Identical) => {
            remove_unreferenced_blob(store, blob);
            Ok(identical)
        }
        Ok(Recorded::Conflict) => {
            remove_unreferenced_blob(store, blob);
            Err(IngestError::Conflict)
        }
        Err(e) => {
            // Not committed (a failed write rolls back); the unreferenced blob is removed now,
            // or by the sweep at the next start when the outcome is unknown (store closed).
            if !matches!(e, StoreError::Closed) {
                remove_unreferenced_blob(store, blob);
            }
            Err(IngestError::Store(e))
        }
    }
}

/// Removes a finished blob that no row references (duplicate, refused or failed write).
fn remove_unreferenced_blob(store: &Store, id: BlobId) {
    let blobs = store.blobs().clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = blobs.remove(&id) {
            warn!(error = %e, "cannot remove an unreferenced blob; the next start sweeps it");
        }
    });
}
