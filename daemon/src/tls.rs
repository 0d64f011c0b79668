//! TLS material for the LAN listeners (FHIR HTTPS, DICOM TLS): rustls with the `ring` provider.
//!
//! On first run of a development box a self-signed certificate for `localhost`/`127.0.0.1` is
//! generated (both files 0600). The certificate is reloadable on SIGHUP through [`TlsReloader`].

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Errors loading or creating TLS material. Never contains key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "TLS key file {path} is readable by group or others (mode {mode:04o}); run `chmod 600`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("no TLS certificate at {path} and generation is disabled")]
    Missing { path: PathBuf },
    #[error("invalid TLS certificate or key: {0}")]
    Invalid(String),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Installs `ring` as the process-wide rustls provider (both ring and aws-lc-rs get compiled in
/// through dependencies; rustls refuses to guess). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Certificate and key paths after applying the `<state_dir>/tls/` defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    pub fn resolve(cfg: &TlsConfig, state_dir: &Path) -> TlsPaths {
        if cfg.cert_file.as_os_str().is_empty() {
            TlsPaths { cert: state_dir.join("tls/cert.pem"), key: state_dir.join("tls/key.pem") }
        } else {
            TlsPaths { cert: cfg.cert_file.clone(), key: cfg.key_file.clone() }
        }
    }
}

/// Where the development CA certificate is written: next to the server certificate.
pub fn ca_path(paths: &TlsPaths) -> PathBuf {
    paths.cert.with_file_name("ca.pem")
}

/// Creates a development certificate (signed by a throw-away CA) when none exists and `generate` allows. Returns whether one
/// was created.
pub fn ensure_certificate(paths: &TlsPaths, generate: bool) -> Result<bool, TlsError> {
    if paths.cert.exists() && paths.key.exists() {
        return Ok(false);
    }
    if !generate {
        return Err(TlsError::Missing { path: paths.cert.clone() });
    }
    // A throw-away CA signs the server certificate, then its key is forgotten: clients trust
    // `ca.pem` (TLS stacks refuse a bare self-signed leaf as a trust anchor, and a CA
    // certificate as a server certificate), and nobody can mint further certificates with it.
    let invalid = |e: rcgen::Error| TlsError::Invalid(e.to_string());
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(invalid)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "hms-edge development CA");
    ca_params.key_usages =
        vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_key = rcgen::KeyPair::generate().map_err(invalid)?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(invalid)?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let mut leaf_params = rcgen::CertificateParams::new(names).map_err(invalid)?;
    leaf_params.distinguished_name.push(rcgen::DnType::CommonName, "hms-edge");
    let leaf_key = rcgen::KeyPair::generate().map_err(invalid)?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca).map_err(invalid)?;
    write_private(&paths.key, leaf_key.serialize_pem().as_bytes())?;
    write_private(&paths.cert, format!("{}{}", leaf.pem(), ca.pem()).as_bytes())?;
    write_private(&ca_path(paths), ca.pem().as_bytes())?;
    Ok(true)
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    let err = |source| TlsError::Write { path: path.to_owned(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(())
}

/// Loads the certificate chain and key into a rustls server config (TLS 1.2 and 1.3).
pub fn load_server_config(paths: &TlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let read_err = |path: &Path, e: &dyn std::fmt::Display| TlsError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let meta = std::fs::metadata(&paths.key).map_err(|e| read_err(&paths.key, &e))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::TooOpen { path: paths.key.clone(), mode });
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .map_err(|e| read_err(&paths.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&paths.cert, &e))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(format!("no certificate in {}", paths.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| read_err(&paths.key, &e))?;
    let cfg = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Invalid(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Hands out the reloader's current certificate for every handshake (so a config with its own
/// client-certificate verifier still follows SIGHUP reloads of the server certificate).
#[derive(Debug)]
struct CurrentCert(Arc<TlsReloader>);

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.current().cert_resolver.resolve(hello)
    }
}

/// The FHIR listener's TLS config when workstations may present client certificates: those
/// issued by the CA in `client_ca` are verified (chain, validity, signature); connections
/// without one are still accepted (they authenticate with a bearer token).
pub fn with_client_ca(
    reloader: Arc<TlsReloader>,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let read_err = |e: &dyn std::fmt::Display| TlsError::Read {
        path: client_ca.to_owned(),
        reason: e.to_string(),
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(client_ca).map_err(|e| read_err(&e))? {
        roots.add(c.map_err(|e| read_err(&e))?).map_err(|e| read_err(&e))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Invalid(format!("no CA certificate in {}", client_ca.display())));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", client_ca.display())))?;
    let alpn = reloader.current().alpn_protocols.clone();
    let mut cfg = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert(reloader)));
    cfg.alpn_protocols = alpn;
    Ok(Arc::new(cfg))
}

/// The subject common name of a DER certificate (the workstation identity).
pub fn subject_cn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(cn)
}

/// The current TLS server config, swapped atomically on reload. Listeners take a fresh
/// `current()` per accepted connection, so a reload applies to new connections only.
#[derive(Debug)]
pub struct TlsReloader {
    paths: RwLock<TlsPaths>,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsReloader {
    pub fn new(paths: TlsPaths, cfg: Arc<ServerConfig>) -> Self {
        TlsReloader { paths: RwLock::new(paths), current: RwLock::new(cfg) }
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls lock").clone()
    }

    pub fn paths(&self) -> TlsPaths {
        self.paths.read().expect("tls lock").clone()
    }

    /// Re-reads the files (possibly at new paths). On error the old certificate stays in use.
    pub fn reload(&self, paths: TlsPaths) -> Result<(), TlsError> {
        let cfg = load_server_config(&paths)?;
        *self.current.write().expect("tls lock") = cfg;
        *self.paths.write().expect("tls lock") = paths;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generates_loads_and_refuses_open_key() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let paths = TlsPaths::resolve(&TlsConfig::default(), dir.path());
        assert!(ensure_certificate(&paths, true).unwrap());
        assert!(!ensure_certificate(&paths, true).unwrap());
        assert_eq!(std::fs::metadata(&paths.key).unwrap().mode() & 0o777, 0o600);
        assert!(load_server_config(&paths).is_ok());
        std::fs::set_permissions(&paths.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_server_config(&paths), Err(TlsError::TooOpen { .. })));
        let missing = TlsPaths { cert: dir.path().join("c"), key: dir.path().join("k") };
        assert!(matches!(ensure_certificate(&missing, false), Err(TlsError::Missing { .. })));
    }
}
