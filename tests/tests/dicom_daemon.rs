//! The DICOM receiver inside the real `hms-edged` binary: DCMTK stores over plain TCP and TLS,
//! the `hms-edge dicom export` command returns the data set as sent, an acknowledged instance
//! survives SIGKILL, and SIGTERM drains cleanly.

mod dicom_common;

use std::process::Command;

use dicom_common::*;
use hms_edge_tests::{DaemonOptions, DaemonProc, bin};

fn export(workdir: &std::path::Path, sop: &str, dest: &std::path::Path) -> std::process::Output {
    run(Command::new(bin("hms-edge"))
        .current_dir(workdir)
        .env_remove("HMS_EDGE_CONFIG")
        .args(["dicom", "export", sop])
        .arg(dest))
}

#[test]
fn daemon_receives_exports_and_survives_sigkill() {
    let work = tempfile::tempdir().unwrap();
    let d = DaemonProc::start(work.path(), &DaemonOptions::default());
    let files = testfiles(&["CT_small.dcm", "US1_J2KR.dcm"]);
    let facts = info(&files);

    let port = d.dicom.port().to_string();
    let out = run(dcmtk("echoscu").args(["-aec", AE, "127.0.0.1", &port]));
    assert!(
        out.status.success(),
        "echoscu: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    let out = run(dcmtk("storescu").args(["-R", "-aec", AE, "127.0.0.1", &port]).arg(&files[0]));
    assert!(
        out.status.success(),
        "storescu: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    // Over TLS, with the daemon's self-signed certificate.
    let tls_port = d.dicom_tls.port().to_string();
    let out = run(dcmtk("storescu")
        .args(["+tla", "-ic", "-R", "-xv", "-aec", AE, "127.0.0.1", &tls_port])
        .arg(&files[1]));
    assert!(
        out.status.success(),
        "storescu +tla: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );

    // Acknowledged means durable: kill -9, restart, export.
    d.signal(nix::sys::signal::Signal::SIGKILL);
    drop(d);
    let d = DaemonProc::start(work.path(), &DaemonOptions::default());
    for (file, fact) in files.iter().zip(&facts) {
        let dest = work.path().join("out.dcm");
        let out = export(work.path(), fact["sop_instance"].as_str().unwrap(), &dest);
        assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
        let cmp = peer(&["compare", &file.display().to_string(), &dest.display().to_string()]);
        let differing: Vec<&str> =
            cmp["differing_tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert!(differing.iter().all(|t| *t == "(FFFC,FFFC)"), "{file:?}: {cmp}");
    }
    let (status, notes, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(notes.iter().any(|n| n.contains("STOPPING=1")));
}
