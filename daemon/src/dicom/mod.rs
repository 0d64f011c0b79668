//! The DICOM receiver of hms-edged: C-ECHO, C-STORE, Study Root C-FIND, C-GET/C-MOVE SCP (Study
//! and Patient Root), Storage Commitment ([`commitment`]); Modality Worklist C-FIND
//! ([`worklist`]) and MPPS N-CREATE/N-SET ([`mpps`]) from the FHIR cache.
//!
//! Layers, each testable alone:
//! - protocol, no I/O: [`pdu`] (framing, PDV split), [`dimse`] (command sets), [`negotiate`]
//!   (association acceptance), [`dataset`] (streaming data set scanner, Part 10 header),
//!   [`query`] (C-FIND matching), [`retrieve`] (C-GET/C-MOVE identifiers, counts, stored data
//!   sets streamed into C-STORE sub-operations), [`uids`] (SOP classes from the standard registry);
//! - storage: [`sink`] (data set → encrypted blob as it arrives), [`ingest`] (the one ingest
//!   commit of C-STORE and STOW-RS: checks, record, orphan blob removal), [`index`] (index
//!   tables, one durable write per instance), [`export`];
//! - I/O: [`assoc`] (one association's state machine over any stream, one file per DIMSE
//!   service), [`scu`] (the association we open to a C-MOVE destination) and the acceptor here
//!   ([`serve`], [`serve_tls`]).
//!
//! Invariants kept here: a C-STORE success is sent only after [`crate::store::Store::write`]
//! resolved (blob fsynced and renamed before, index + outbox committed and fsynced); a malformed
//! or abandoned transfer leaves no blob and no row; the same SOP Instance UID never silently
//! replaces stored content.

pub mod assoc;
pub mod commitment;
pub mod conformance;
pub mod evict;
pub mod export;
pub mod index;
pub mod ingest;
pub mod mpps;
pub mod negotiate;
pub mod pdu;
pub mod quickack;
pub mod recall;
pub mod retrieve;
pub mod scu;
pub mod sink;
pub mod worklist;

pub use hms_edge_dicom::{dataset, dimse, query, uids};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::{DicomConfig, DuplicatePolicy};
use crate::store::Store;
pub use negotiate::AccessPolicy;

/// Connections not yet accepted as an association (TLS handshake, waiting for the
/// A-ASSOCIATE-RQ, negotiating), plain and TLS listeners together. They do not hold an
/// association slot: silent sockets cannot lock out the modalities.
pub const MAX_PENDING_CONNECTIONS: usize = 64;
/// Of those, at most this many from one source address (a modality opens a few at once).
pub const MAX_PENDING_PER_ADDRESS: usize = 8;

/// Settings fixed at start.
#[derive(Debug, Clone)]
pub struct DicomSettings {
    pub ae_title: String,
    pub max_pdu: u32,
    pub max_associations: usize,
    pub artim: Duration,
    pub idle: Duration,
    pub duplicate_policy: DuplicatePolicy,
    pub max_find_results: usize,
    /// `site.patient_id_system`: the Patient identifier given as Patient ID in worklist items.
    pub patient_id_system: String,
    /// `storage.recall_timeout_secs`: how long a retrieve waits for evicted instances.
    pub recall_timeout: Duration,
}

impl DicomSettings {
    pub fn from_config(c: &DicomConfig) -> Self {
        Self {
            ae_title: c.ae_title.trim().to_owned(),
            max_pdu: c.max_pdu_bytes,
            max_associations: c.max_associations as usize,
            artim: Duration::from_secs(c.artim_timeout_secs),
            idle: Duration::from_secs(c.idle_timeout_secs),
            duplicate_policy: c.duplicate_policy,
            max_find_results: c.max_find_results as usize,
            patient_id_system: crate::config::DEFAULT_PATIENT_ID_SYSTEM.into(),
            recall_timeout: Duration::from_secs(crate::config::DEFAULT_STORAGE_RECALL_TIMEOUT_SECS),
        }
    }
}

/// What every association shares: the store, settings, the (reloadable) access policy and the
/// association slots (shared by the plain and TLS listeners).
pub struct DicomContext {
    pub store: Arc<Store>,
    pub settings: DicomSettings,
    policy: RwLock<Arc<AccessPolicy>>,
    slots: Arc<Semaphore>,
    /// Admission of connections before their association is accepted.
    pending: Arc<crate::conn_gate::ConnGate>,
    /// Studies retrieved (C-GET, C-MOVE), for eviction's least-recently-used order.
    pub accessed: Arc<evict::AccessLog>,
}

impl std::fmt::Debug for DicomContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DicomContext").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl DicomContext {
    pub fn new(store: Arc<Store>, config: &DicomConfig) -> Arc<Self> {
        Self::with_settings(
            store,
            config,
            DicomSettings::from_config(config),
            evict::AccessLog::new(),
        )
    }

    /// As [`DicomContext::new`], with the site's settings (the worklist's Patient ID system).
    pub fn for_site(
        store: Arc<Store>,
        config: &DicomConfig,
        site: &crate::config::SiteConfig,
        storage: &crate::config::StorageConfig,
        accessed: Arc<evict::AccessLog>,
    ) -> Arc<Self> {
        let mut settings = DicomSettings::from_config(config);
        settings.patient_id_system = site.patient_id_system.clone();
        settings.recall_timeout = Duration::from_secs(storage.recall_timeout_secs);
        Self::with_settings(store, config, settings, accessed)
    }

    fn with_settings(
        store: Arc<Store>,
        config: &DicomConfig,
        settings: DicomSettings,
        accessed: Arc<evict::AccessLog>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            accessed,
            slots: Arc::new(Semaphore::new(settings.max_associations)),
            pending: crate::conn_gate::ConnGate::new(
                "dicom",
                MAX_PENDING_CONNECTIONS,
                MAX_PENDING_PER_ADDRESS,
            ),
            settings,
            policy: RwLock::new(Arc::new(AccessPolicy::from_config(config))),
        })
    }

    /// The access policy new associations are checked against.
    pub fn policy(&self) -> Arc<AccessPolicy> {
        self.policy.read().expect("policy lock").clone()
    }

    /// Replaces the access policy (SIGHUP). Returns a description of the change, if any.
    /// Established associations keep going; new ones see the new policy.
    pub fn reload(&self, config: &DicomConfig) -> Option<String> {
        let new = AccessPolicy::from_config(config);
        let mut cur = self.policy.write().expect("policy lock");
        if **cur == new {
            return None;
        }
        let msg = format!(
            "dicom allow-list: {} peers (was {}), loopback callers {}",
            new.peers.len(),
            cur.peers.len(),
            if new.accept_loopback { "accepted" } else { "refused" }
        );
        *cur = Arc::new(new);
        Some(msg)
    }

    /// Associations in progress.
    pub fn active_associations(&self) -> usize {
        self.settings.max_associations - self.slots.available_permits()
    }

    /// Takes an association slot, if one is free (held for the association's life).
    pub fn try_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }
}

/// Serves plain DICOM on `listener` until `shutdown` resolves; then stops accepting, lets each
/// association finish the message it is in (idle ones are aborted), and returns once all ended.
/// Dropping the returned future instead aborts everything at once; partial instances are removed.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<DicomContext>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    accept_loop(listener, ctx, shutdown, None).await
}

/// Where each TLS connection takes its server configuration from (so that a certificate
/// reloaded on SIGHUP applies to the next connection).
pub type TlsSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

/// Serves DICOM over TLS (PS3.15 B.1/B.3 profiles: TLS 1.2+) on `listener`; otherwise as [`serve`].
pub async fn serve_tls(
    listener: TcpListener,
    ctx: Arc<DicomContext>,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_tls_with(listener, ctx, Arc::new(move || tls.clone()), shutdown).await
}

/// As [`serve_tls`], asking `tls` for the current configuration at each connection.
pub async fn serve_tls_with(
    listener: TcpListener,
    ctx: Arc<DicomContext>,
    tls: TlsSource,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    accept_loop(listener, ctx, shutdown, Some(tls)).await
}

/// A TLS server configuration for DICOM that requires a client certificate issued by one of the
/// CAs in `client_ca_pem` (the `dicom.tls_client_ca_file` allow-list), with our certificate
/// chain and key from PEM files. TLS 1.2 and 1.3 only (rustls has nothing older).
pub fn tls_config_with_client_ca(
    cert_pem: &std::path::Path,
    key_pem: &std::path::Path,
    client_ca_pem: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let what = |p: &std::path::Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_pem)
        .map_err(|e| what(cert_pem, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| what(cert_pem, &e))?;
    let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| what(key_pem, &e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca_pem).map_err(|e| what(client_ca_pem, &e))? {
        roots.add(ca.map_err(|e| what(client_ca_pem, &e))?).map_err(|e| what(client_ca_pem, &e))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificate", client_ca_pem.display()));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| what(client_ca_pem, &e))?;
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| what(cert_pem, &e))?;
    Ok(Arc::new(config))
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<DicomContext>,
    shutdown: impl Future<Output = ()>,
    tls: Option<TlsSource>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let addr = listener.local_addr()?;
    info!(%addr, tls = tls.is_some(), ae_title = %ctx.settings.ae_title, "DICOM listener ready");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let (sock, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Nagle off: a C-STORE-RSP must not wait for the delayed ACK of the SCU.
                if let Err(e) = sock.set_nodelay(true) {
                    warn!(error = %e, "cannot set TCP_NODELAY");
                }
                let pending = match ctx.pending.try_admit(peer.ip()) {
                    Ok(p) => p,
                    Err(why) => {
                        debug!(%peer, limit = why.as_str(), "too many pending connections; closed");
                        metrics::counter!("hms_dicom_connections_refused_total",
                            "reason" => why.as_str()).increment(1);
                        drop(sock);
                        continue;
                    }
                };
                let ctx = ctx.clone();
                let stop = stop_rx.clone();
                let tls = tls.as_ref().map(|source| tokio_rustls::TlsAcceptor::from(source()));
                tasks.spawn(async move {
                    handle(sock, peer, ctx, stop, pending, tls).await;
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    info!(%addr, associations = tasks.len(), "DICOM listener closed; draining associations");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn handle(
    sock: TcpStream,
    peer: SocketAddr,
    ctx: Arc<DicomContext>,
    stop: watch::Receiver<bool>,
    pending: crate::conn_gate::GatePermit,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let sock = quickack::QuickAck(sock);
    match tls {
        None => assoc::serve_connection(sock, peer, ctx, stop, pending).await,
        Some(acceptor) => {
            match tokio::time::timeout(ctx.settings.artim, acceptor.accept(sock)).await {
                Ok(Ok(stream)) => assoc::serve_connection(stream, peer, ctx, stop, pending).await,
                Ok(Err(e)) => warn!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => warn!(%peer, "TLS handshake timed out"),
            }
        }
    }
}
