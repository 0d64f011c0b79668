//! C-GET and C-MOVE (PS3.4 C.4.2, C.4.3), the parts without an association: the retrieve
//! identifier (levels PATIENT, STUDY, SERIES, IMAGE and their unique keys), which stored instances
//! it names, sub-operation counts and statuses, and the streaming of a stored data set into
//! C-STORE-RQ P-DATA (the bytes exactly as received, never transcoded).
//!
//! The association side is `assoc::retrieve` (C-GET on the requester's association, C-MOVE
//! through [`super::scu`]).

use std::io::{self, Read};

use bytes::Bytes;
use rusqlite::Connection;
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;

use super::dataset::part10_dataset_offset;
use super::dimse::{Command, field, tag};
use super::pdu;
use crate::store::{BlobId, BlobStore, StoreError};
pub use hms_edge_dicom::retrieve::*;

/// Data set chunks read ahead of the socket per sub-operation.
const READ_AHEAD: usize = 8;

/// One stored instance to send (its newest version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub sop_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub blob: BlobId,
    pub study_uid: String,
    pub series_uid: String,
    /// Whether its file is here (false: evicted; the cloud PACS holds it).
    pub held: bool,
}

/// The instances an identifier names, in study, series, instance number order; at most `limit`
/// (`Err(limit)` beyond).
pub fn resolve(
    conn: &Connection,
    r: &Retrieve,
    limit: usize,
) -> Result<Result<Vec<Target>, usize>, StoreError> {
    let found = super::index::retrieve_targets(
        conn,
        r.patient_id.as_deref(),
        &r.studies,
        &r.series,
        &r.instances,
        limit,
    )?;
    Ok(found.map(|all| {
        all.into_iter()
            .map(|i| Target {
                sop_uid: i.sop_uid,
                sop_class_uid: i.sop_class_uid,
                transfer_syntax: i.transfer_syntax,
                blob: i.blob,
                study_uid: i.study_uid,
                series_uid: i.series_uid,
                held: i.held,
            })
            .collect()
    }))
}

/// The C-STORE-RQ of a sub-operation (with the Move Originator for C-MOVE).
pub fn store_rq(message_id: u16, t: &Target, originator: Option<(&str, u16)>) -> Command {
    let mut c = Command::new();
    c.set_u16(tag::COMMAND_FIELD, field::C_STORE_RQ)
        .set_u16(tag::MESSAGE_ID, message_id)
        .set_u16(tag::PRIORITY, 0)
        .set_u16(tag::COMMAND_DATA_SET_TYPE, 0)
        .set_uid(tag::AFFECTED_SOP_CLASS_UID, &t.sop_class_uid)
        .set_uid(tag::AFFECTED_SOP_INSTANCE_UID, &t.sop_uid);
    if let Some((ae, id)) = originator {
        c.set_ae(tag::MOVE_ORIGINATOR_AE_TITLE, ae).set_u16(tag::MOVE_ORIGINATOR_MESSAGE_ID, id);
    }
    c
}

/// Reads a stored data set (after our File Meta) on a blocking thread in chunks of at most
/// `chunk` bytes, a few chunks ahead. The first item is an error when the blob cannot be opened,
/// so nothing has been sent when a sub-operation fails that way. Every chunk is authenticated
/// by the blob reader before it is handed out.
pub fn read_dataset(
    blobs: BlobStore,
    blob: BlobId,
    chunk: usize,
) -> mpsc::Receiver<io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let run = || -> io::Result<()> {
            let mut r = blobs.open_reader(&blob)?;
            let mut head = [0u8; 144];
            r.read_exact(&mut head)?;
            let off = part10_dataset_offset(&head).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "stored file has no File Meta")
            })?;
            io::copy(&mut (&mut r).take((off - 144) as u64), &mut io::sink())?;
            loop {
                let mut buf = vec![0u8; chunk];
                let mut n = 0;
                while n < chunk {
                    match r.read(&mut buf[n..])? {
                        0 => break,
                        k => n += k,
                    }
                }
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return Ok(()); // the receiver gave up (cancel, abort)
                }
                if n < chunk {
                    return Ok(());
                }
            }
        };
        if let Err(e) = run() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// Why a data set could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing was sent: the sub-operation fails, the association goes on.
    #[error("stored instance unreadable: {0}")]
    Unreadable(io::Error),
    /// Part of the message went out: the association must be aborted.
    #[error("stored instance unreadable after part of it was sent: {0}")]
    Broken(io::Error),
    #[error("connection lost: {0}")]
    Io(io::Error),
}

/// Sends a C-STORE-RQ and the stored data set on presentation context `pc`, each PDU no larger
/// than `peer_max`, with bounded memory (one chunk in flight plus the read-ahead).
pub async fn send_store<W: AsyncWrite + Unpin>(
    w: &mut W,
    pc: u8,
    rq: &Command,
    blobs: &BlobStore,
    t: &Target,
    peer_max: u32,
) -> Result<(), SendError> {
    let mut rx = read_dataset(blobs.clone(), t.blob.clone(), pdu::max_fragment(peer_max));
    let closed = || io::Error::new(io::ErrorKind::UnexpectedEof, "blob reader stopped");
    let mut held = match rx.recv().await {
        Some(Ok(b)) => b,
        Some(Err(e)) => return Err(SendError::Unreadable(e)),
        None => return Err(SendError::Unreadable(closed())),
    };
    let mut out = Vec::with_capacity(held.len() + 512);
    pdu::encode_pdata(&mut out, pc, true, &rq.encode(), peer_max);
    loop {
        let next = match rx.recv().await {
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => return Err(SendError::Broken(e)),
            None => None,
        };
        pdu::encode_fragment(&mut out, pc, false, &held, next.is_none());
        pdu::send(w, &out).await.map_err(SendError::Io)?;
        metrics::counter!("hms_dicom_bytes_sent_total").increment(held.len() as u64);
        out.clear();
        match next {
            Some(b) => held = b,
            None => return Ok(()),
        }
    }
}
