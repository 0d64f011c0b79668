//! A 1 GiB multi-frame instance (issue 3, item 5): DCMTK `storescu` sends 2,048 frames of
//! 512 × 512 × 16 bit to the real `hms-edged`, which must stream it into the blob store as the
//! PDVs arrive — its peak resident memory stays far below the instance's size — and
//! `hms-edge dicom export` must return the data set byte for byte.

mod dicom_common;

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use dicom_common::*;
use hms_edge_tests::{DaemonOptions, DaemonProc, bin};
use sha2::{Digest, Sha256};

const ROWS: u16 = 512;
const COLUMNS: u16 = 512;
const FRAMES: u32 = 2048;
const PIXEL_BYTES: u32 = ROWS as u32 * COLUMNS as u32 * 2 * FRAMES; // 1 GiB
/// Multi-frame Grayscale Word Secondary Capture Image Storage.
const SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.7.3";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
/// Far below the 1 GiB a receiver buffering the instance would need, with room for the
/// daemon's own pools (it idles at ~20 MiB).
const MAX_PEAK_RSS_MIB: u64 = 192;

/// An explicit-VR little-endian element with a 16-bit length, padded to even length.
fn short_element(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) {
    let pad = if vr == b"UI" { 0u8 } else { b' ' };
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(pad);
    }
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    out.extend_from_slice(&v);
}

fn us(out: &mut Vec<u8>, group: u16, elem: u16, value: u16) {
    short_element(out, group, elem, b"US", &value.to_le_bytes());
}

/// Writes the Part 10 file; returns the SHA-256 of its data set (everything after the meta).
fn write_large_instance(path: &Path, sop_instance: &str) -> String {
    let mut meta_body = Vec::new();
    meta_body.extend_from_slice(&[0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
    short_element(&mut meta_body, 0x0002, 0x0002, b"UI", SOP_CLASS.as_bytes());
    short_element(&mut meta_body, 0x0002, 0x0003, b"UI", sop_instance.as_bytes());
    short_element(&mut meta_body, 0x0002, 0x0010, b"UI", EXPLICIT_LE.as_bytes());
    short_element(&mut meta_body, 0x0002, 0x0012, b"UI", b"1.2.826.0.1.3680043.10.1482.99");
    let mut head = vec![0u8; 128];
    head.extend_from_slice(b"DICM");
    short_element(&mut head, 0x0002, 0x0000, b"UL", &(meta_body.len() as u32).to_le_bytes());
    head.extend_from_slice(&meta_body);

    let mut ds = Vec::new();
    short_element(&mut ds, 0x0008, 0x0016, b"UI", SOP_CLASS.as_bytes());
    short_element(&mut ds, 0x0008, 0x0018, b"UI", sop_instance.as_bytes());
    short_element(&mut ds, 0x0008, 0x0060, b"CS", b"OT");
    short_element(&mut ds, 0x0010, 0x0010, b"PN", b"Large^Multiframe");
    short_element(&mut ds, 0x0010, 0x0020, b"LO", b"LARGE-1");
    short_element(&mut ds, 0x0020, 0x000D, b"UI", format!("{sop_instance}.1").as_bytes());
    short_element(&mut ds, 0x0020, 0x000E, b"UI", format!("{sop_instance}.2").as_bytes());
    short_element(&mut ds, 0x0020, 0x0013, b"IS", b"1");
    us(&mut ds, 0x0028, 0x0002, 1);
    short_element(&mut ds, 0x0028, 0x0004, b"CS", b"MONOCHROME2");
    short_element(&mut ds, 0x0028, 0x0008, b"IS", FRAMES.to_string().as_bytes());
    us(&mut ds, 0x0028, 0x0010, ROWS);
    us(&mut ds, 0x0028, 0x0011, COLUMNS);
    us(&mut ds, 0x0028, 0x0100, 16);
    us(&mut ds, 0x0028, 0x0101, 16);
    us(&mut ds, 0x0028, 0x0102, 15);
    us(&mut ds, 0x0028, 0x0103, 0);
    ds.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0]);
    ds.extend_from_slice(&PIXEL_BYTES.to_le_bytes());

    let mut file = BufWriter::with_capacity(1 << 20, File::create(path).unwrap());
    let mut hash = Sha256::new();
    file.write_all(&head).unwrap();
    file.write_all(&ds).unwrap();
    hash.update(&ds);
    // Frames that differ from each other (a constant would hide reordered chunks): windows of
    // one pseudo-random block, each stamped with its frame number.
    let frame_len = ROWS as usize * COLUMNS as usize * 2;
    let mut block = vec![0u8; 2 * frame_len];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for w in block.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let mut frame = vec![0u8; frame_len];
    for i in 0..FRAMES {
        let start = (i as usize * 4099) % frame_len;
        frame.copy_from_slice(&block[start..start + frame_len]);
        frame[..4].copy_from_slice(&i.to_le_bytes());
        file.write_all(&frame).unwrap();
        hash.update(&frame);
    }
    file.into_inner().unwrap().sync_all().unwrap();
    hex::encode(hash.finalize())
}

/// SHA-256 of a Part 10 file's data set, streamed.
fn dataset_sha256(path: &Path) -> String {
    let mut f = File::open(path).unwrap();
    let mut head = [0u8; 144];
    f.read_exact(&mut head).unwrap();
    assert_eq!(&head[128..132], b"DICM", "{path:?} is not a Part 10 file");
    assert_eq!(&head[132..136], &[0x02, 0x00, 0x00, 0x00], "{path:?}: no group length first");
    let meta_len = u32::from_le_bytes(head[140..144].try_into().unwrap()) as u64;
    std::io::copy(&mut (&mut f).take(meta_len), &mut std::io::sink()).unwrap();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    hex::encode(hash.finalize())
}

fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

#[test]
fn a_one_gib_multiframe_instance_streams_in_bounded_memory_and_exports_unchanged() {
    let work = tempfile::tempdir().unwrap();
    let sop = format!("2.25.{}", rand::random::<u64>());
    let src = work.path().join("large.dcm");
    let t = Instant::now();
    let sent_hash = write_large_instance(&src, &sop);
    eprintln!("generated 1 GiB instance in {:.1} s", t.elapsed().as_secs_f64());

    let d = DaemonProc::start(work.path(), &DaemonOptions::default());
    let port = d.dicom.port().to_string();
    let t = Instant::now();
    let out = run(dcmtk("storescu")
        .env("TCP_NODELAY", "1")
        .args(["-v", "-R", "-aec", AE, "127.0.0.1", &port])
        .arg(&src));
    let secs = t.elapsed().as_secs_f64();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("Received Store Response (Success)"),
        "storescu: {text}\n{}",
        d.log_text()
    );
    let rss = peak_rss_mib(d.child.id());
    eprintln!(
        "stored 1 GiB in {secs:.1} s ({:.0} MB/s); hms-edged peak RSS {rss} MiB",
        f64::from(PIXEL_BYTES) / 1e6 / secs
    );
    assert!(rss <= MAX_PEAK_RSS_MIB, "peak RSS {rss} MiB for a 1 GiB instance");
    std::fs::remove_file(&src).unwrap();

    // Export while the daemon runs; the data set must be the one sent, byte for byte.
    let dest = work.path().join("export.dcm");
    let out = run(Command::new(bin("hms-edge"))
        .current_dir(work.path())
        .env_remove("HMS_EDGE_CONFIG")
        .args(["dicom", "export", &sop])
        .arg(&dest));
    assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dataset_sha256(&dest), sent_hash, "exported data set differs from the one sent");
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
}
