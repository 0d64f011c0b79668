//! Where a C-STORE data set goes while it arrives: straight into an encrypted blob (as a Part 10
//! file), through the [`DatasetScanner`]; the blob's SHA-256 covers exactly the data set bytes.
//!
//! [`InstanceSink`] is synchronous and knows nothing of the network. [`SinkHandle`] runs one on a
//! blocking thread fed through a small bounded channel, so encryption and file writes overlap
//! with receiving the next PDUs while memory stays bounded (a few PDUs per association).

use std::io::Write;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::dataset::{DatasetScanner, FileMeta, IndexAttrs, part10_header};
use super::uids::DatasetEncoding;
use crate::store::{BlobMeta, BlobStore, BlobWriter};

/// Why an instance could not be received.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The data set is not well-formed (truncated, bad structure, bad deflate stream).
    #[error("malformed data set: {0}")]
    Malformed(String),
    /// Writing the blob failed (disk full, I/O error).
    #[error("cannot write the instance: {0}")]
    Io(#[from] std::io::Error),
    /// The transfer was abandoned (association aborted, released mid-transfer, shutdown).
    #[error("transfer abandoned")]
    Abandoned,
}

/// A received, fsynced (but not yet registered) instance.
#[derive(Debug, Clone)]
pub struct ReceivedInstance {
    pub blob: BlobMeta,
    pub attrs: IndexAttrs,
    /// SHA-256 (hex) of the data set bytes exactly as received: the duplicate check.
    pub dataset_sha256: String,
    /// Data set bytes as received.
    pub dataset_size: u64,
}

/// Streams one data set into a blob.
pub struct InstanceSink {
    blob: BlobWriter,
    scanner: DatasetScanner,
    inflater: Option<Inflater>,
    dataset_size: u64,
}

struct Inflater {
    z: flate2::Decompress,
    out: Vec<u8>,
    ended: bool,
    trailing: usize,
}

/// Bytes tolerated after the end of a deflated data set.
const MAX_DEFLATE_TRAILER: usize = 8;

impl InstanceSink {
    /// Starts a blob and writes the File Meta Information.
    pub fn new(blobs: &BlobStore, meta: &FileMeta, enc: DatasetEncoding) -> std::io::Result<Self> {
        // The File Meta Information is ours, not the modality's: stored, but not hashed.
        let blob = blobs.create_with_header(&part10_header(meta))?;
        Ok(Self {
            blob,
            scanner: DatasetScanner::new(enc.explicit_vr),
            inflater: enc.deflated.then(|| Inflater {
                z: flate2::Decompress::new(false),
                out: vec![0; 64 * 1024],
                ended: false,
                trailing: 0,
            }),
            dataset_size: 0,
        })
    }

    /// Appends data set bytes exactly as received.
    pub fn write(&mut self, data: &[u8]) -> Result<(), SinkError> {
        self.blob.write_all(data)?;
        self.dataset_size += data.len() as u64;
        match &mut self.inflater {
            None => self.scanner.feed(data),
            Some(inf) => {
                let mut input = data;
                while !input.is_empty() {
                    if inf.ended {
                        // Tolerated after the end of the deflate stream: the NUL that pads an
                        // odd length (PS3.5 A.5) or the 8-byte CRC32+size trailer some writers
                        // append. They are kept as received; more is a malformed data set.
                        inf.trailing += input.len();
                        if inf.trailing > MAX_DEFLATE_TRAILER {
                            return Err(SinkError::Malformed(
                                "bytes after the end of the deflate stream".into(),
                            ));
                        }
                        break;
                    }
                    let before_in = inf.z.total_in();
                    let before_out = inf.z.total_out();
                    let status = inf
                        .z
                        .decompress(input, &mut inf.out, flate2::FlushDecompress::None)
                        .map_err(|e| SinkError::Malformed(format!("deflate: {e}")))?;
                    let used = (inf.z.total_in() - before_in) as usize;
                    let produced = (inf.z.total_out() - before_out) as usize;
                    self.scanner.feed(&inf.out[..produced]);
                    input = &input[used..];
                    if status == flate2::Status::StreamEnd {
                        inf.ended = true;
                    } else if used == 0 && produced == 0 {
                        return Err(SinkError::Malformed("deflate stream stalled".into()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks that the data set is complete and well-formed, then fsyncs the blob into place.
    /// A malformed data set never reaches the blob folder (its temp file is removed).
    pub fn finish(mut self) -> Result<ReceivedInstance, SinkError> {
        if let Some(inf) = &mut self.inflater {
            // Drain what the inflater still holds.
            loop {
                let before_out = inf.z.total_out();
                let status = inf
                    .z
                    .decompress(&[], &mut inf.out, flate2::FlushDecompress::Finish)
                    .map_err(|e| SinkError::Malformed(format!("deflate: {e}")))?;
                let produced = (inf.z.total_out() - before_out) as usize;
                self.scanner.feed(&inf.out[..produced]);
                if status == flate2::Status::StreamEnd {
                    inf.ended = true;
                }
                if produced == 0 {
                    break;
                }
            }
            if !inf.ended {
                return Err(SinkError::Malformed("deflate stream is truncated".into()));
            }
        }
        let attrs = self.scanner.finish().map_err(SinkError::Malformed)?;
        let blob = self.blob.finish()?;
        Ok(ReceivedInstance {
            dataset_sha256: blob.sha256.clone(),
            blob,
            attrs,
            dataset_size: self.dataset_size,
        })
    }
}

enum Msg {
    Data(Bytes),
    End,
}

/// An [`InstanceSink`] on a blocking thread.
pub struct SinkHandle {
    tx: mpsc::Sender<Msg>,
    done: tokio::task::JoinHandle<Result<ReceivedInstance, SinkError>>,
}

/// Fragments buffered between the network and the blob writer (each at most one PDU).
const SINK_QUEUE: usize = 8;

impl SinkHandle {
    /// Starts the writer thread; creating the blob happens there too.
    pub fn start(blobs: BlobStore, meta: FileMeta, enc: DatasetEncoding) -> SinkHandle {
        let (tx, mut rx) = mpsc::channel::<Msg>(SINK_QUEUE);
        let done = tokio::task::spawn_blocking(move || {
            let mut sink = InstanceSink::new(&blobs, &meta, enc)?;
            let mut failure: Option<SinkError> = None;
            loop {
                match rx.blocking_recv() {
                    Some(Msg::Data(b)) => {
                        if failure.is_none()
                            && let Err(e) = sink.write(&b)
                        {
                            failure = Some(e);
                        }
                    }
                    Some(Msg::End) => break,
                    // Sender dropped without End: abandoned; dropping the sink removes the file.
                    None => return Err(SinkError::Abandoned),
                }
            }
            match failure {
                Some(e) => Err(e),
                None => sink.finish(),
            }
        });
        SinkHandle { tx, done }
    }

    /// Queues a fragment (waits while the writer is behind: back-pressure on the socket).
    pub async fn push(&mut self, data: Bytes) {
        // If the writer thread is gone, `finish` reports why.
        let _ = self.tx.send(Msg::Data(data)).await;
    }

    /// Ends the data set and waits until it is checked and fsynced.
    pub async fn finish(self) -> Result<ReceivedInstance, SinkError> {
        let _ = self.tx.send(Msg::End).await;
        drop(self.tx);
        match self.done.await {
            Ok(r) => r,
            Err(e) => Err(SinkError::Io(std::io::Error::other(format!("writer task failed: {e}")))),
        }
    }

    /// Abandons the transfer: nothing of it remains on disk.
    pub fn abandon(self) {
        drop(self.tx);
    }
}
