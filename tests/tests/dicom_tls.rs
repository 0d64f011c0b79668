//! DICOM over TLS (rustls) with DCMTK's `storescu +tls`/`+tla` and `echoscu`: instances arrive
//! over TLS exactly as over plain TCP; a plain-TCP caller on the TLS port is refused.

mod dicom_common;

use std::sync::Arc;

use dicom_common::*;
use hms_edge::config::DicomConfig;

struct Pki {
    dir: tempfile::TempDir,
    config: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    hms_edge::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.path().join("server.crt"), ck.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    Pki { dir, config: Arc::new(config) }
}

#[test]
fn store_and_echo_over_tls_with_dcmtk() {
    let pki = pki();
    let scp = Scp::start_with(DicomConfig::default(), Some(pki.config.clone()));
    let tls_port = scp.tls_port.unwrap().to_string();
    let ca = pki.dir.path().join("server.crt");

    // Server certificate verified against our CA file.
    let out = run(dcmtk("echoscu").arg("+tla").arg("+cf").arg(&ca).args([
        "-aec",
        AE,
        "127.0.0.1",
        &tls_port,
    ]));
    assert!(out.status.success(), "echoscu +tla: {}", String::from_utf8_lossy(&out.stderr));

    let files = testfiles(&["CT_small.dcm", "US1_J2KR.dcm"]);
    let facts = info(&files);
    let out = run(dcmtk("storescu")
        .arg("+tla")
        .arg("+cf")
        .arg(&ca)
        .args(["-R", "-xv", "-aec", AE, "127.0.0.1", &tls_port])
        .args(&files));
    assert!(out.status.success(), "storescu +tla: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(scp.counts().2, 2);
    for (file, fact) in files.iter().zip(&facts) {
        let exported = scp.export(fact["sop_instance"].as_str().unwrap());
        let cmp = peer(&["compare", &file.display().to_string(), &exported.display().to_string()]);
        let differing: Vec<&str> =
            cmp["differing_tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert!(differing.iter().all(|t| *t == "(FFFC,FFFC)"), "{file:?}: {cmp}");
    }

    // Plain DICOM on the TLS port: no association.
    let out = run(dcmtk("echoscu").args(["-to", "5", "-aec", AE, "127.0.0.1", &tls_port]));
    assert!(!out.status.success());
    // And the plain port still serves plain DICOM.
    let out = run(dcmtk("echoscu").args(["-aec", AE, "127.0.0.1", &scp.port.to_string()]));
    assert!(out.status.success());
}

/// A CA, a server certificate and a client certificate it issued, as PEM files.
fn pki_with_ca(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    for (name, sans) in [
        ("server", vec!["localhost".to_string(), "127.0.0.1".to_string()]),
        ("client", vec!["modality1".to_string()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans).unwrap().signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
}

#[test]
fn client_certificates_from_the_allowed_ca_are_required_when_configured() {
    hms_edge::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    pki_with_ca(p);
    let cfg = hms_edge::dicom::tls_config_with_client_ca(
        &p.join("server.crt"),
        &p.join("server.key"),
        &p.join("ca.crt"),
    )
    .unwrap();
    let scp = Scp::start_with(DicomConfig::default(), Some(cfg));
    let tls_port = scp.tls_port.unwrap().to_string();
    // With a client certificate from the CA: accepted. (-ic: this test is about the server
    // checking the client; DCMTK's check of an rcgen server certificate is not the point.)
    let out = run(dcmtk("echoscu")
        .arg("+tls")
        .arg(p.join("client.key"))
        .arg(p.join("client.crt"))
        .arg("-ic")
        .args(["-aec", AE, "127.0.0.1", &tls_port]));
    assert!(out.status.success(), "echoscu +tls: {}", String::from_utf8_lossy(&out.stderr));
    // Without one: the handshake fails, no association.
    let out = run(dcmtk("echoscu").args(["+tla", "-ic", "-aec", AE, "127.0.0.1", &tls_port]));
    assert!(!out.status.success());
    // A client certificate from another CA: refused.
    let other = tempfile::tempdir().unwrap();
    pki_with_ca(other.path());
    let out = run(dcmtk("echoscu")
        .arg("+tls")
        .arg(other.path().join("client.key"))
        .arg(other.path().join("client.crt"))
        .arg("-ic")
        .args(["-aec", AE, "127.0.0.1", &tls_port]));
    assert!(!out.status.success());
}
