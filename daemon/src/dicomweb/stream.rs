//! WADO-RS bodies streamed from the encrypted blobs: a blocking thread reads (and authenticates)
//! each blob chunk by chunk and hands the pieces to the response through a small channel, so a
//! study of any size is served in bounded memory; a client that goes away stops the reader.

use std::io::{self, Read};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc;

use super::json::{self, Bulk, PixelData, WalkOptions};
use super::multipart::{self, MediaType};
use super::{DicomWebContext, Located, retrieve_prelude};
use crate::dicom::dataset::part10_dataset_offset;
use crate::fhir::FhirError;
use crate::http_caller::Caller;
use crate::store::BlobStore;

/// Pieces in flight between the blob reader and the socket.
const CHANNEL: usize = 8;
/// Bytes per piece.
const PIECE: usize = 64 * 1024;

type Tx = mpsc::Sender<io::Result<Bytes>>;

/// A response body fed by `produce` on a blocking thread.
fn body_from(produce: impl FnOnce(&Tx) -> io::Result<()> + Send + 'static) -> Body {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = produce(&tx) {
            if e.kind() != io::ErrorKind::BrokenPipe {
                tracing::warn!(error = %e, "DICOMweb response ended early");
            }
            // The client sees a truncated body (the connection is not completed cleanly).
            let _ = tx.blocking_send(Err(e));
        }
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

fn send(tx: &Tx, b: Bytes) -> io::Result<()> {
    tx.blocking_send(Ok(b)).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client gone"))
}

/// Copies `n` bytes (all when `None`) of `r` into the channel.
fn pump(tx: &Tx, r: &mut impl Read, n: Option<u64>) -> io::Result<u64> {
    let mut left = n.unwrap_or(u64::MAX);
    let mut total = 0;
    while left > 0 {
        let mut buf = vec![0u8; PIECE.min(left.try_into().unwrap_or(PIECE))];
        let got = r.read(&mut buf)?;
        if got == 0 {
            if n.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "value shorter than expected",
                ));
            }
            break;
        }
        buf.truncate(got);
        send(tx, Bytes::from(buf))?;
        left -= got as u64;
        total += got as u64;
    }
    Ok(total)
}

fn multipart_response(part_type: &str, boundary: &str, body: Body) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    if let Ok(v) = HeaderValue::from_str(&multipart::content_type(part_type, boundary)) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Refuses (406) an `Accept` that allows no `multipart/related; type="application/dicom"`.
/// Instances are served in their stored transfer syntax (never transcoded), named in each part.
pub fn check_accept_dicom(headers: &HeaderMap) -> Result<(), FhirError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let ok = multipart::split_unquoted(accept, ',').iter().any(|a| {
        let m = MediaType::parse(a);
        match m.essence.as_str() {
            "*/*" | "multipart/*" => true,
            "multipart/related" => m.param("type").is_none_or(|t| {
                matches!(t.to_ascii_lowercase().as_str(), "application/dicom" | "application/*")
            }),
            _ => false,
        }
    });
    if ok {
        Ok(())
    } else {
        Err(FhirError::NotAcceptable(format!(
            "Accept {accept:?}: this resource is served as multipart/related; type=\"application/dicom\""
        )))
    }
}

/// The stored instances as one multipart/related body of Part 10 files, exactly as stored.
pub fn instances(ctx: &DicomWebContext, found: Vec<Located>) -> Response {
    let blobs = ctx.store.blobs().clone();
    let boundary = multipart::new_boundary();
    let b = boundary.clone();
    let body = body_from(move |tx| {
        for (i, inst) in found.iter().enumerate() {
            let ct = format!("application/dicom; transfer-syntax={}", inst.transfer_syntax);
            send(tx, multipart::part_head(&b, i == 0, &ct, None))?;
            let mut r = blobs.open_reader(&inst.blob)?;
            pump(tx, &mut r, None)?;
            metrics::counter!("hms_dicomweb_retrieved_instances_total").increment(1);
        }
        send(tx, multipart::closing(&b, !found.is_empty()))
    });
    multipart_response("application/dicom", &boundary, body)
}

/// The data set of a stored instance (after our File Meta), inflated when deflated, and
/// whether it is explicit VR.
pub fn open_dataset(blobs: &BlobStore, inst: &Located) -> io::Result<(Box<dyn Read + Send>, bool)> {
    let mut r = blobs.open_reader(&inst.blob)?;
    let mut head = [0u8; 144];
    r.read_exact(&mut head)?;
    let off = part10_dataset_offset(&head).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "stored file has no File Meta")
    })?;
    io::copy(&mut (&mut r).take((off - 144) as u64), &mut io::sink())?;
    let ts = inst.transfer_syntax.as_str();
    let enc = crate::dicom::uids::dataset_encoding(ts).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "stored transfer syntax unknown")
    })?;
    let reader: Box<dyn Read + Send> = if enc.deflated {
        Box::new(flate2::read::DeflateDecoder::new(io::BufReader::new(r)))
    } else {
        Box::new(r)
    };
    Ok((reader, enc.explicit_vr))
}

fn instance_url(base: &str, i: &Located) -> String {
    format!("{base}/studies/{}/series/{}/instances/{}", i.study_uid, i.series_uid, i.sop_uid)
}

/// The bulk data URI of an element of an instance.
fn bulk_uri(instance_url: &str, b: Bulk) -> String {
    match b {
        Bulk::PixelData => format!("{instance_url}/bulk/7FE00010"),
        Bulk::Range { offset, length } => format!("{instance_url}/bulk/{offset}.{length}"),
    }
}

/// DICOM JSON of each instance, streamed as one JSON array.
pub fn metadata(ctx: &DicomWebContext, found: Vec<Located>, base: String) -> Response {
    let blobs = ctx.store.blobs().clone();
    let body = body_from(move |tx| {
        send(tx, Bytes::from_static(b"["))?;
        for (i, inst) in found.iter().enumerate() {
            let (r, explicit) = open_dataset(&blobs, inst)?;
            let url = instance_url(&base, inst);
            let opts = WalkOptions { inline_max: super::INLINE_MAX, stop_at_pixel_data: true };
            let w = json::walk(r, explicit, opts, &|b| bulk_uri(&url, b))?;
            let mut text = if i == 0 { String::new() } else { ",".into() };
            text.push_str(&Value::Object(w.attrs).to_string());
            send(tx, Bytes::from(text))?;
        }
        send(tx, Bytes::from_static(b"]"))
    });
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(super::DICOM_JSON));
    r
}

/// Media type of the frames of a transfer syntax (PS3.18 Table 8.7.3-2), as stored.
fn frame_media_type(ts: &str) -> &'static str {
    use dicom_dictionary_std::uids;
    match ts {
        uids::JPEG_BASELINE8_BIT
        | uids::JPEG_EXTENDED12_BIT
        | uids::JPEG_LOSSLESS
        | uids::JPEG_LOSSLESS_SV1 => "image/jpeg",
        uids::JPEGLS_LOSSLESS | uids::JPEGLS_NEAR_LOSSLESS => "image/jls",
        uids::JPEG2000_LOSSLESS | uids::JPEG2000 => "image/jp2",
        uids::JPEG2000MC_LOSSLESS | uids::JPEG2000MC => "image/jpx",
        uids::HTJ2K_LOSSLESS | uids::HTJ2K_LOSSLESS_RPCL | uids::HTJ2K => "image/jphc",
        uids::RLE_LOSSLESS => "image/dicom-rle",
        _ => "application/octet-stream",
    }
}

/// Walks an instance fully to find its Pixel Data and frame geometry (blocking).
fn pixel_layout(blobs: &BlobStore, inst: &Located) -> io::Result<(PixelData, u64, Option<u64>)> {
    let (r, explicit) = open_dataset(blobs, inst)?;
    let opts = WalkOptions { inline_max: super::INLINE_MAX, stop_at_pixel_data: false };
    let w = json::walk(r, explicit, opts, &|_| String::new())?;
    let pixel = w.pixel.clone().ok_or_else(|| io::Error::other("no Pixel Data"))?;
    let frames = w.number(0x0028_0008).unwrap_or(1).max(1);
    let bits = w.number(0x0028_0100);
    // Frames of 1-bit data (segmentations) are byte-aligned when each frame's bit count is.
    let size = match (w.number(0x0028_0010), w.number(0x0028_0011), bits) {
        (Some(rows), Some(cols), Some(bits)) => {
            // Checked: the geometry comes from a stored, maybe crafted, instance.
            let spp = w.number(0x0028_0002).unwrap_or(1);
            let frame_bits = rows
                .checked_mul(cols)
                .and_then(|p| p.checked_mul(spp))
                .and_then(|p| p.checked_mul(bits));
            frame_bits.filter(|b| b.is_multiple_of(8) && *b > 0).map(|b| b / 8)
        }
        _ => None,
    };
    Ok((pixel, frames, size))
}

/// Streams byte ranges of an instance's data set, one part each, in the order given.
fn ranges_response(
    blobs: BlobStore,
    inst: Located,
    parts: Vec<Vec<(u64, u64)>>,
    media: &'static str,
) -> Response {
    let boundary = multipart::new_boundary();
    let b = boundary.clone();
    let ct = if media == "application/octet-stream" {
        media.to_owned()
    } else {
        format!("{media}; transfer-syntax={}", inst.transfer_syntax)
    };
    let body = body_from(move |tx| {
        let mut cur: Option<(Box<dyn Read + Send>, u64)> = None;
        for (i, ranges) in parts.iter().enumerate() {
            send(tx, multipart::part_head(&b, i == 0, &ct, None))?;
            for &(off, len) in ranges {
                if cur.as_ref().is_none_or(|(_, pos)| *pos > off) {
                    cur = Some((open_dataset(&blobs, &inst)?.0, 0));
                }
                let (r, pos) = cur.as_mut().expect("reader opened");
                let skipped = io::copy(&mut (&mut *r).take(off - *pos), &mut io::sink())?;
                *pos += skipped;
                if *pos != off {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "range beyond the data set",
                    ));
                }
                *pos += pump(tx, r, Some(len))?;
            }
        }
        send(tx, multipart::closing(&b, !parts.is_empty()))
    });
    multipart_response(media, &boundary, body)
}

/// Parses `1,3,5` (1-based frame numbers).
fn frame_list(s: &str) -> Result<Vec<u64>, FhirError> {
    let list: Option<Vec<u64>> =
        s.split(',').map(|f| f.trim().parse::<u64>().ok().filter(|n| *n > 0)).collect();
    match list {
        Some(l) if !l.is_empty() && l.len() <= 10_000 => Ok(l),
        _ => Err(FhirError::BadRequest(format!(
            "frame list {s:?} is not a comma-separated list of frame numbers (1-based)"
        ))),
    }
}

/// `…/instances/{sop}/frames/{list}`: native frames as application/octet-stream, compressed
/// ones as stored (their image media type with the transfer syntax).
pub async fn frames(
    State(ctx): State<Arc<DicomWebContext>>,
    Path((study, series, sop, list)): Path<(String, String, String, String)>,
    caller: Caller,
) -> Result<Response, FhirError> {
    let ids = (study.as_str(), Some(series.as_str()), Some(sop.as_str()));
    let (_, mut found) = retrieve_prelude(&caller, &ctx, "dicomweb-frames", ids).await?;
    let wanted = frame_list(&list)?;
    let inst = found.remove(0);
    let blobs = ctx.store.blobs().clone();
    let (b2, i2) = (blobs.clone(), inst.clone());
    let (pixel, n, size) = tokio::task::spawn_blocking(move || pixel_layout(&b2, &i2))
        .await
        .map_err(|e| FhirError::Internal(e.to_string()))?
        .map_err(|e| {
            FhirError::NotFound(format!("instance {sop} has no readable Pixel Data: {e}"))
        })?;
    let mut parts = Vec::new();
    let mut ranges = 0usize;
    for f in wanted {
        let part = json::frame_ranges(&pixel, f, n, size).map_err(FhirError::NotFound)?;
        // A frame list repeating a frame of many fragments must not multiply memory.
        ranges += part.len();
        if ranges > json::MAX_FRAGMENTS {
            return Err(FhirError::BadRequest("too many frames in one request".into()));
        }
        parts.push(part);
    }
    let media = match pixel {
        PixelData::Native { .. } => "application/octet-stream",
        PixelData::Encapsulated { .. } => frame_media_type(&inst.transfer_syntax),
    };
    Ok(ranges_response(blobs, inst, parts, media))
}

/// `…/instances/{sop}/bulk/{spec}`: `7FE00010` (the Pixel Data: its value, or every frame when
/// encapsulated) or `offset.length` (a value named by a metadata `BulkDataURI`).
pub async fn bulk(
    State(ctx): State<Arc<DicomWebContext>>,
    Path((study, series, sop, spec)): Path<(String, String, String, String)>,
    caller: Caller,
) -> Result<Response, FhirError> {
    let range = if spec.eq_ignore_ascii_case("7FE00010") {
        None
    } else {
        let parsed = spec
            .split_once('.')
            .and_then(|(o, l)| Some((o.parse::<u64>().ok()?, l.parse::<u64>().ok()?)));
        Some(parsed.ok_or_else(|| {
            FhirError::BadRequest(format!("bulk data reference {spec:?} is not valid"))
        })?)
    };
    let ids = (study.as_str(), Some(series.as_str()), Some(sop.as_str()));
    let (_, mut found) = retrieve_prelude(&caller, &ctx, "dicomweb-bulkdata", ids).await?;
    let inst = found.remove(0);
    let blobs = ctx.store.blobs().clone();
    if let Some(r) = range {
        return Ok(ranges_response(blobs, inst, vec![vec![r]], "application/octet-stream"));
    }
    let (b2, i2) = (blobs.clone(), inst.clone());
    let (pixel, n, size) = tokio::task::spawn_blocking(move || pixel_layout(&b2, &i2))
        .await
        .map_err(|e| FhirError::Internal(e.to_string()))?
        .map_err(|e| {
            FhirError::NotFound(format!("instance {sop} has no readable Pixel Data: {e}"))
        })?;
    match &pixel {
        PixelData::Native { offset, length } => Ok(ranges_response(
            blobs,
            inst,
            vec![vec![(*offset, *length)]],
            "application/octet-stream",
        )),
        PixelData::Encapsulated { .. } => {
            let parts = json::all_frame_ranges(&pixel, n, size).map_err(FhirError::NotFound)?;
            let media = frame_media_type(&inst.transfer_syntax);
            Ok(ranges_response(blobs, inst, parts, media))
        }
    }
}
