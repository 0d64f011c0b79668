//! Bad input: random and truncated PDUs, wrong lengths, oversized PDUs, a data set that ends
//! mid-element, an abandoned transfer, an unknown caller. Each gets a clean reject or abort, the
//! server keeps serving, and nothing is stored.

mod dicom_common;

use dicom_common::*;
use hms_edge::config::{DicomConfig, DicomPeer};
use hms_edge::dicom::dimse::{field, tag};

fn assert_nothing_stored(scp: &Scp) {
    // Give a writer thread that was abandoned a moment to clean up.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(scp.counts(), (0, 0, 0), "index rows");
    assert_eq!(scp.rows(), (0, 0), "blob rows / outbox");
    assert_eq!(scp.blob_files(), (0, 0), "blob files / temp files");
}

fn still_serving(scp: &Scp) {
    let out = run(dcmtk("echoscu").args(["-aec", AE, "127.0.0.1", &scp.port.to_string()]));
    assert!(
        out.status.success(),
        "server stopped answering: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The data set of CT_small.dcm and its SOP Instance UID.
fn ct_small() -> (Vec<u8>, String) {
    let files = testfiles(&["CT_small.dcm"]);
    let sop = info(&files)[0]["sop_instance"].as_str().unwrap().to_owned();
    (dataset_of(&files[0]), sop)
}

#[test]
fn garbage_before_association_is_aborted() {
    let scp = Scp::start();
    let mut rng_state = 0x2545F4914F6CDD1Du64;
    for round in 0..20 {
        let mut c = RawClient::connect(scp.port);
        let mut bytes = Vec::new();
        for _ in 0..(64 + round * 37) {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            bytes.push(rng_state as u8);
        }
        c.send(&bytes);
        assert!(c.expect_abort(), "round {round}");
    }
    // A TLS ClientHello on the plain port, and an HTTP request.
    let mut c = RawClient::connect(scp.port);
    c.send(&[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03]);
    assert!(c.expect_abort());
    let mut c = RawClient::connect(scp.port);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.expect_abort());
    still_serving(&scp);
    assert_nothing_stored(&scp);
}

#[test]
fn truncated_association_request_is_aborted() {
    let scp = Scp::start();
    let rq = associate_rq("RAW", AE, &[(VERIFICATION, IMPLICIT_LE)]);
    // The header claims more than what follows, then the caller goes away.
    let mut c = RawClient::connect(scp.port);
    c.send(&rq[..rq.len() / 2]);
    c.sock.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.expect_abort());
    // A wrong length inside: presentation context item longer than the PDU.
    let mut bad = rq.clone();
    // Variable items start after the 6-byte header and 68 fixed bytes.
    let pc = 74 + bad[74..].windows(2).position(|w| w == [0x20, 0x00]).unwrap();
    bad[pc + 2] = 0x7f;
    let mut c = RawClient::connect(scp.port);
    c.send(&bad);
    assert!(c.expect_abort());
    still_serving(&scp);
}

#[test]
fn oversized_pdu_is_aborted_and_the_instance_discarded() {
    let config = DicomConfig { max_pdu_bytes: 16384, ..DicomConfig::default() };
    let scp = Scp::start_with(config, None);
    let (ds, sop) = ct_small();
    let mut c = RawClient::associate(scp.port, "RAW", &[(CT_STORAGE, EXPLICIT_LE)]);
    c.send_pdata(1, true, &c_store_rq(1, CT_STORAGE, &sop), 0);
    c.send_fragment(1, &ds[..8000], false);
    // Then a P-DATA-TF announcing 1 MiB: over our Maximum Length of 16 KiB.
    let mut pdu = vec![0x04, 0x00];
    pdu.extend_from_slice(&(1u32 << 20).to_be_bytes());
    pdu.extend_from_slice(&[0u8; 64]);
    c.send(&pdu);
    assert!(c.expect_abort());
    assert_nothing_stored(&scp);
    still_serving(&scp);
}

#[test]
fn wrong_pdv_length_is_aborted() {
    let scp = Scp::start();
    let (_, sop) = ct_small();
    let mut c = RawClient::associate(scp.port, "RAW", &[(CT_STORAGE, EXPLICIT_LE)]);
    let cmd = c_store_rq(1, CT_STORAGE, &sop);
    let mut out = Vec::new();
    hms_edge::dicom::pdu::encode_pdata(&mut out, 1, true, &cmd, 0);
    // PDV item length larger than the PDU that carries it.
    out[6..10].copy_from_slice(&(cmd.len() as u32 + 100).to_be_bytes());
    c.send(&out);
    assert!(c.expect_abort());
    // A PDV on a presentation context that was never accepted.
    let mut c = RawClient::associate(scp.port, "RAW", &[(CT_STORAGE, EXPLICIT_LE)]);
    c.send_pdata(9, true, &cmd, 0);
    assert!(c.expect_abort());
    // A data set fragment where a command belongs.
    let mut c = RawClient::associate(scp.port, "RAW", &[(CT_STORAGE, EXPLICIT_LE)]);
    c.send_pdata(1, false, b"\x08\x00\x18\x00UI\x02\x001\x00", 0);
    assert!(c.expect_abort());
    still_serving(&scp);
    assert_nothing_stored(&scp);
}

#[test]
fn data_set_ending_mid_element_is_refused_and_not_stored() {
    let scp = Scp::start();
    let (ds, sop) = ct_small();
    for cut in [3usize, 100, ds.len() / 2, ds.len() - 1] {
        let mut c = RawClient::associate(scp.port, "RAW", &[(CT_STORAGE, EXPLICIT_LE)]);
        c.send_pdata(1, true, &c_store_rq(7, CT_STORAGE, &sop), 0);
        c.send_pdata(1, false, &ds[..cut], 16384);
        let rsp = c.read_command().expect("C-STORE-RSP");
        assert_eq!(rsp.command_field(), field::C_STORE_RSP);
        assert_eq!(rsp.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO), Some(7));
        assert_eq!(rsp.u16(tag::STATUS), Some(0xC000), "cut at {cut}");
        assert!(rsp.str(tag::ERROR_COMMENT).is_some());
    }
    assert_nothing_stored(&scp);
    // The same association goes on to store the complete instance.
    let mut c = RawClient::associate(scp.port, "RAW", &[(CT_STORAGE, EXPLICIT_LE)]);
    c.send_pdata(1, true, &c_store_rq(8, CT_STORAGE, &sop), 0);
    c.send_pdata(1, false, &ds, 16384);
    assert_eq!(c.read_command().unwrap().u16(tag::STATUS), Some(0));
    assert_eq!(scp.counts().2, 1);
}

#[test]
fn abandoned_transfer_leaves_nothing() {
    let scp = Scp::start();
    let (ds, sop) = ct_small();
    // Peer aborts in the middle of the data set.
    let mut c = RawClient::associate(scp.port, "RAW", &[(CT_STORAGE, EXPLICIT_LE)]);
    c.send_pdata(1, true, &c_store_rq(1, CT_STORAGE, &sop), 0);
    let mut out = Vec::new();
    hms_edge::dicom::pdu::encode_pdata(&mut out, 1, false, &ds, 4096);
    c.send(&out[..out.len() / 2]);
    c.send(&[0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
    drop(c);
    // Peer just disconnects in the middle of a PDU.
    let mut c = RawClient::associate(scp.port, "RAW", &[(CT_STORAGE, EXPLICIT_LE)]);
    c.send_pdata(1, true, &c_store_rq(1, CT_STORAGE, &sop), 0);
    c.send(&out[..out.len() / 2 + 3]);
    drop(c);
    // Peer releases in the middle of the data set.
    let mut c = RawClient::associate(scp.port, "RAW", &[(CT_STORAGE, EXPLICIT_LE)]);
    c.send_pdata(1, true, &c_store_rq(1, CT_STORAGE, &sop), 0);
    c.send_fragment(1, &ds[..1000], false);
    c.send_fragment(1, &ds[1000..2000], false);
    c.send(&[0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
    assert_eq!(c.read_pdu().map(|p| p.0), Some(0x06), "A-RELEASE-RP");
    assert_nothing_stored(&scp);
    still_serving(&scp);
}

#[test]
fn instance_whose_uid_differs_from_the_command_is_refused() {
    let scp = Scp::start();
    let (ds, _) = ct_small();
    let mut c = RawClient::associate(scp.port, "RAW", &[(CT_STORAGE, EXPLICIT_LE)]);
    c.send_pdata(1, true, &c_store_rq(1, CT_STORAGE, "1.2.3.4.5"), 0);
    c.send_pdata(1, false, &ds, 16384);
    assert_eq!(c.read_command().unwrap().u16(tag::STATUS), Some(0xA900));
    assert_nothing_stored(&scp);
}

#[test]
fn unknown_callers_are_rejected_with_the_standard_reason() {
    let config = DicomConfig {
        accept_loopback_callers: false,
        peers: vec![
            DicomPeer::new("CT_ROOM1", "127.0.0.1"),
            DicomPeer::new("FAR_AWAY", "192.0.2.7"),
        ],
        ..DicomConfig::default()
    };
    let scp = Scp::start_with(config, None);
    let port = scp.port.to_string();
    // DCMTK sees the rejection.
    let out = run(dcmtk("echoscu").args(["-aet", "INTRUDER", "-aec", AE, "127.0.0.1", &port]));
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(text.contains("Rejected") || text.contains("rejected"), "{text}");
    // On the wire: A-ASSOCIATE-RJ, permanent, service user, calling AE not recognized (3).
    let rj = |calling: &str, called: &str| {
        let mut c = RawClient::connect(scp.port);
        c.send(&associate_rq(calling, called, &[(VERIFICATION, IMPLICIT_LE)]));
        c.read_pdu().unwrap()
    };
    let (ty, body) = rj("INTRUDER", AE);
    assert_eq!(ty, 0x03);
    assert_eq!(&body[1..4], &[1, 1, 3]);
    // Known AE title from the wrong address.
    let (ty, body) = rj("FAR_AWAY", AE);
    assert_eq!((ty, &body[1..4]), (0x03, &[1u8, 1, 3][..]));
    // Wrong called AE title: reason 7.
    let (ty, body) = rj("CT_ROOM1", "SOMEONE-ELSE");
    assert_eq!((ty, &body[1..4]), (0x03, &[1u8, 1, 7][..]));
    // The allowed caller gets in.
    let out = run(dcmtk("echoscu").args(["-aet", "CT_ROOM1", "-aec", AE, "127.0.0.1", &port]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Reload (SIGHUP path): INTRUDER becomes allowed for new associations.
    let mut reloaded = DicomConfig { accept_loopback_callers: false, ..DicomConfig::default() };
    reloaded.peers.push(DicomPeer::new("INTRUDER", ""));
    assert!(scp.ctx.reload(&reloaded).is_some());
    let out = run(dcmtk("echoscu").args(["-aet", "INTRUDER", "-aec", AE, "127.0.0.1", &port]));
    assert!(out.status.success());
}

#[test]
fn silent_connections_are_closed_by_the_artim_timer() {
    let config =
        DicomConfig { artim_timeout_secs: 1, idle_timeout_secs: 2, ..DicomConfig::default() };
    let scp = Scp::start_with(config, None);
    let started = std::time::Instant::now();
    let mut c = RawClient::connect(scp.port);
    assert!(c.read_pdu().is_none(), "closed without a PDU");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // An established but idle association is aborted after the idle timeout.
    let mut c = RawClient::associate(scp.port, "RAW", &[(VERIFICATION, IMPLICIT_LE)]);
    let started = std::time::Instant::now();
    assert!(c.expect_abort());
    assert!(started.elapsed() >= std::time::Duration::from_millis(1500));
}
