//! Daemon lifecycle: start (keys → store → TLS → listeners), READY, watchdog, SIGHUP reload,
//! SIGTERM drain.
//!
//! Ordering is the contract with systemd: `READY=1` is sent only after the store is open and every
//! listener is bound, so `systemctl start` returning means the box accepts work. On SIGTERM we
//! send `STOPPING=1`, stop accepting, give in-flight work `lifecycle.shutdown_grace_secs` to
//! finish, then close the store (queued writes commit; anything unfinished rolls back, never
//! half-written).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Config};
use crate::keys::{self, KeySource};
use crate::logging::LogHandle;
use crate::store::{Store, StoreOptions};
use crate::tls::{self, TlsPaths, TlsReloader};

/// Settings that SIGHUP applies to the running daemon. Any other change is logged as needing a
/// restart and not applied.
pub const RELOADABLE: &[&str] = &[
    "log.level",
    "tls.cert_file",
    "tls.key_file",
    "admin.min_free_disk_mb",
    "storage.high_watermark",
    "storage.low_watermark",
    "storage.critical_free",
    "storage.records_reserve",
    "storage.eviction",
    "storage.protect_secs",
    "storage.check_interval_secs",
    "dicom.peers",
    "dicom.accept_loopback_callers",
];

/// Why the daemon could not start. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("cannot open the store in {dir}: {source}")]
    Store { dir: PathBuf, source: crate::store::StoreError },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Jwks(#[from] crate::fhir::auth::JwksError),
    #[error("cannot create the internal API socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Lock(#[from] crate::ops::LockError),
    #[error(
        "the store in {dir} is under the new master key in {next}, not under {key}: a key \
         rotation was interrupted after the database was switched; run `hms-edge rotate-key` to \
         finish it"
    )]
    RotationInterrupted { dir: PathBuf, key: PathBuf, next: PathBuf },
}

/// Everything the running daemon shares between its tasks.
pub struct Daemon {
    config: RwLock<Arc<Config>>,
    config_path: Option<PathBuf>,
    pub store: Arc<Store>,
    pub tls: Arc<TlsReloader>,
    pub started: Instant,
    pub metrics: PrometheusHandle,
    pub log: Option<LogHandle>,
    /// Cancelled when shutdown begins; every listener and long task watches it.
    pub shutdown: CancellationToken,
    /// In-flight work that the drain waits for.
    pub tasks: TaskTracker,
    config_tx: tokio::sync::watch::Sender<Arc<Config>>,
    /// FHIR token verifier (None: authentication off, development on loopback).
    pub fhir_verifier: Option<crate::fhir::auth::Verifier>,
    /// The state-folder lock, held while the daemon lives (see `ops`).
    _state_lock: crate::ops::StateLock,
    /// The integrity ledger (Merkle log, checkpoints, proofs).
    pub ledger: Arc<crate::ledger::Ledger>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").field("store", &self.store).finish_non_exhaustive()
    }
}

impl Daemon {
    /// The effective configuration (after reloads).
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config lock").clone()
    }

    /// Subsystems that react to reloads (allow-lists, …) watch this.
    pub fn subscribe_config(&self) -> tokio::sync::watch::Receiver<Arc<Config>> {
        self.config_tx.subscribe()
    }
}

/// The bound listeners, handed from [`start`] to [`run`].
#[derive(Debug)]
pub struct Listeners {
    pub admin: TcpListener,
    pub fhir: TcpListener,
    pub dicom: TcpListener,
    /// The DICOM TLS listener, when `dicom.tls_enabled`.
    pub dicom_tls: Option<TcpListener>,
    /// The internal API socket for hms-edge-agent, and its path.
    pub internal: tokio::net::UnixListener,
    pub internal_path: PathBuf,
}

impl Listeners {
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener has an address")
    }

    pub fn fhir_addr(&self) -> SocketAddr {
        self.fhir.local_addr().expect("bound listener has an address")
    }

    pub fn dicom_addr(&self) -> SocketAddr {
        self.dicom.local_addr().expect("bound listener has an address")
    }

    pub fn dicom_tls_addr(&self) -> Option<SocketAddr> {
        self.dicom_tls.as_ref().map(|l| l.local_addr().expect("bound listener has an address"))
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what, addr, source })
}

/// Opens keys, store and TLS material and binds the listeners. Logs where everything is.
pub async fn start(
    config: Config,
    config_path: Option<PathBuf>,
    log: Option<LogHandle>,
) -> Result<(Arc<Daemon>, Listeners), StartError> {
    let state_dir = config.state_dir();
    std::fs::create_dir_all(&state_dir)?;
    // One process per state folder: `hms-edge restore`/`rotate-key` and a second daemon are
    // kept out while this one runs.
    let state_lock = crate::ops::StateLock::acquire(&state_dir)?;
    if crate::ops::restore::recover(&state_dir)? {
        tracing::warn!(state_dir = %state_dir.display(), "finished an interrupted restore");
    }
    let key_source = KeySource::resolve(&config.keys.master_key_file, &state_dir);
    let (master, generated) = keys::load_or_generate(&key_source, config.keys.generate_if_missing)?;
    if let KeySource::File(p) = &key_source {
        let next = crate::ops::with_suffix(p, ".next");
        if next.exists() {
            if let Some(next) = crate::ops::rotate::interrupted_rotation_key(&state_dir, p) {
                return Err(StartError::RotationInterrupted {
                    dir: state_dir.clone(),
                    key: p.clone(),
                    next,
                });
            }
            tracing::warn!(
                key = %p.display(),
                next = %next.display(),
                "an interrupted key rotation left a new key that was never used; the store is \
                 still under the current key; run `hms-edge rotate-key` to clean up and rotate"
            );
        }
    }
    if generated {
        tracing::warn!(
            path = %key_source.path().display(),
            "generated a new master key (development default); back it up: without it the store \
             cannot be read"
        );
    }
    let opts = StoreOptions {
        group_commit_max_batch: config.store.group_commit_max_batch as usize,
        db_cache_kib: config.store.db_cache_kib,
        db_reader_cache_kib: config.store.db_reader_cache_kib,
        db_readers: config.store.db_readers as usize,
    };
    let store_dir = state_dir.clone();
    let store = tokio::task::spawn_blocking(move || crate::store::open(&store_dir, &master, &opts))
        .await
        .map_err(std::io::Error::other)?
        .map_err(|source| {
            if matches!(source, crate::store::StoreError::WrongKey)
                && matches!(key_source, KeySource::Credential(_))
            {
                tracing::error!(
                    "the master-key credential does not open the store; if `hms-edge rotate-key` \
                     was interrupted, run it again to finish it"
                );
            }
            StartError::Store { dir: state_dir.clone(), source }
        })?;
    store.space().set_policy(space_policy(&config));
    let ledger = crate::ledger::Ledger::new(store.ledger_signing_key(), &config.ledger_origin());
    // Leases held when the daemon stopped belong to requests that died with it: the agent may
    // take those changes again at once (every push is idempotent, see `sync`).
    let released = store
        .write(crate::sync::outbox::release_after_restart)
        .await
        .map_err(|source| StartError::Store { dir: state_dir.clone(), source })?;
    if released > 0 {
        tracing::info!(released, "released the agent's leases from before the restart");
    }
    let adopted = ledger
        .adopt_existing(&store)
        .await
        .map_err(|source| StartError::Store { dir: state_dir.clone(), source })?;
    if adopted > 0 {
        tracing::info!(adopted, "records stored before the integrity ledger existed were logged");
    }

    let tls_paths = TlsPaths::resolve(&config.tls, &state_dir);
    if tls::ensure_certificate(&tls_paths, config.tls.generate_self_signed)? {
        tracing::warn!(cert = %tls_paths.cert.display(), "generated a self-signed TLS certificate");
    }
    let tls_cfg = tls::load_server_config(&tls_paths)?;

    let fhir_verifier = match config.fhir.auth {
        crate::config::FhirAuth::None => {
            tracing::warn!(
                listen = %config.fhir.listen,
                "FHIR authentication is OFF (fhir.auth = \"none\"): development only, loopback only"
            );
            None
        }
        crate::config::FhirAuth::Jwt => Some(crate::fhir::auth::Verifier::load(
            &config.fhir.jwks_file,
            &config.fhir.jwt_issuer,
            &config.fhir.jwt_audience,
            config.fhir.jwt_leeway_secs,
            &config.fhir.tenant_claim,
            &config.site.tenant_id,
        )?),
    };
    let admin = bind("admin", config.admin.listen).await?;
    let fhir = bind("fhir", config.fhir.listen).await?;
    let dicom = bind("dicom", config.dicom.listen).await?;
    let dicom_tls = match config.dicom.tls_enabled {
        true => Some(bind("dicom-tls", config.dicom.tls_listen).await?),
        false => None,
    };
    let internal_path = crate::sync::internal::socket_path(&config.internal.socket, &state_dir);
    let internal = crate::sync::internal::bind(&internal_path)
        .map_err(|source| StartError::Socket { path: internal_path.clone(), source })?;
    let listeners = Listeners { admin, fhir, dicom, dicom_tls, internal, internal_path };

    let metrics = crate::admin::metrics_handle();
    crate::admin::register_counters();
    let config = Arc::new(config);
    let (config_tx, _) = tokio::sync::watch::channel(config.clone());
    let daemon = Arc::new(Daemon {
        config: RwLock::new(config),
        config_path,
        store,
        tls: Arc::new(TlsReloader::new(tls_paths.clone(), tls_cfg)),
        started: Instant::now(),
        metrics,
        log,
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        config_tx,
        fhir_verifier,
        _state_lock: state_lock,
        ledger,
    });
    tracing::info!(
        state_dir = %state_dir.display(),
        database = %state_dir.join(crate::store::DB_FILE).display(),
        blobs = %state_dir.join(crate::store::BLOB_DIR).display(),
        master_key = %key_source_label(&key_source),
        tls_cert = %tls_paths.cert.display(),
        admin = %format!("http://{}", listeners.admin_addr()),
        fhir = %format!("https://{}/fhir", listeners.fhir_addr()),
        dicom = %listeners.dicom_addr(),
        dicom_tls = %listeners.dicom_tls_addr().map_or("off".into(), |a| a.to_string()),
        internal_api = %listeners.internal_path.display(),
        dicom_ae_title = %daemon.config().dicom.ae_title,
        config = %daemon.config_path.as_ref().map_or("embedded defaults".into(), |p| p.display().to_string()),
        "hms-edged started"
    );
    Ok((daemon, listeners))
}

fn key_source_label(src: &KeySource) -> String {
    match src {
        KeySource::Credential(p) => format!("systemd credential {}", p.display()),
        KeySource::File(p) => format!("file {}", p.display()),
    }
}

/// Serves until `shutdown` resolves or SIGTERM/SIGINT arrives, then drains. Sends READY=1 once
/// serving, handles SIGHUP reloads and keeps the systemd watchdog fed while the store answers.
pub async fn run(
    daemon: Arc<Daemon>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    // Handlers first: a SIGHUP right after READY must reload, not kill us (its default action).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let token = daemon.shutdown.clone();
    let admin_app = crate::admin::router(daemon.clone());
    let admin_token = token.clone();
    let admin_task = tokio::spawn(async move {
        axum::serve(listeners.admin, admin_app)
            .with_graceful_shutdown(admin_token.cancelled_owned())
            .await
    });

    let cfg = daemon.config();
    // Fixed workstations may present client certificates (mTLS) issued by the site's CA.
    let client_auth = if cfg.fhir.client_ca_file.as_os_str().is_empty() {
        None
    } else {
        let c = tls::with_client_ca(daemon.tls.clone(), &cfg.fhir.client_ca_file)?;
        tracing::info!(
            ca = %cfg.fhir.client_ca_file.display(),
            identities = cfg.fhir.client_certs.len(),
            "FHIR workstations may authenticate with client certificates"
        );
        Some(c)
    };
    let fhir_ctx = crate::fhir::http::FhirContext::new(
        daemon.store.clone(),
        cfg.fhir.max_body_bytes as usize,
        daemon.fhir_verifier.clone(),
        daemon.ledger.clone(),
        cfg.fhir.client_certs.clone(),
    );
    // Retrieves by C-GET, C-MOVE and WADO-RS, for the eviction task's least-recently-used order.
    let accessed = crate::dicom::evict::AccessLog::new();
    daemon.tasks.spawn(crate::dicom::evict::run(
        daemon.store.clone(),
        accessed.clone(),
        daemon.subscribe_config(),
        token.clone(),
    ));
    // DICOMweb shares the FHIR listener, its auth and its audit.
    let dicomweb_ctx = Arc::new(crate::dicomweb::DicomWebContext {
        accessed: accessed.clone(),
        recall_timeout: Duration::from_secs(cfg.storage.recall_timeout_secs),
        store: daemon.store.clone(),
        access: fhir_ctx.access.clone(),
        max_body_bytes: cfg.fhir.max_body_bytes as usize,
        duplicate_policy: cfg.dicom.duplicate_policy,
        max_results: cfg.dicom.max_find_results as usize,
    });
    let fhir_addr = listeners.fhir.local_addr()?;
    tokio::spawn(crate::https::serve(
        listeners.fhir,
        daemon.tls.clone(),
        client_auth,
        crate::fhir::http::router(fhir_ctx.clone()).merge(crate::dicomweb::router(dicomweb_ctx)),
        cfg.fhir.max_connections as usize,
        token.clone(),
        daemon.tasks.clone(),
    ));

    // The agent's door to the store.
    let internal_ctx = Arc::new(crate::sync::internal::InternalContext {
        store: daemon.store.clone(),
        tenant_id: cfg.site.tenant_id.clone(),
        site_id: cfg.site.site_id.clone(),
        ledger: daemon.ledger.clone(),
        patient_id_system: cfg.site.patient_id_system.clone(),
    });
    tokio::spawn(crate::sync::internal::serve(listeners.internal, internal_ctx, token.clone()));

    // Signed checkpoints of the integrity ledger, offline, whenever the log grew.
    daemon.tasks.spawn(daemon.ledger.clone().checkpointer(
        daemon.store.clone(),
        Duration::from_secs(cfg.ledger.checkpoint_interval_secs),
        token.clone(),
    ));

    // ImagingStudy resources follow the studies the DICOM receiver stores.
    let link = crate::fhir::imaging::ImagingLink {
        patient_id_system: cfg.site.patient_id_system.clone(),
        dicomweb_base: crate::dicomweb::public_base(fhir_addr),
    };
    daemon.tasks.spawn(crate::fhir::imaging::refresher(daemon.store.clone(), link, token.clone()));

    // DICOM: plain and TLS listeners share the association slots; the allow-list follows
    // SIGHUP reloads; on shutdown each association finishes the message it is in.
    let dicom_ctx = crate::dicom::DicomContext::for_site(
        daemon.store.clone(),
        &cfg.dicom,
        &cfg.site,
        &cfg.storage,
        accessed,
    );
    daemon.tasks.spawn(crate::dicom::serve(
        listeners.dicom,
        dicom_ctx.clone(),
        token.clone().cancelled_owned(),
    ));
    if let Some(listener) = listeners.dicom_tls {
        let source: crate::dicom::TlsSource = if cfg.dicom.tls_client_ca_file.as_os_str().is_empty()
        {
            let tls = daemon.tls.clone();
            Arc::new(move || tls.current())
        } else {
            // Client certificates required: built once at start (a new certificate or CA file
            // for DICOM TLS takes a restart).
            let paths = daemon.tls.paths();
            let cfg = crate::dicom::tls_config_with_client_ca(
                &paths.cert,
                &paths.key,
                &cfg.dicom.tls_client_ca_file,
            )
            .map_err(|e| std::io::Error::other(format!("dicom.tls_client_ca_file: {e}")))?;
            Arc::new(move || cfg.clone())
        };
        daemon.tasks.spawn(crate::dicom::serve_tls_with(
            listener,
            dicom_ctx.clone(),
            source,
            token.clone().cancelled_owned(),
        ));
    }
    let mut config_rx = daemon.subscribe_config();
    tokio::spawn(async move {
        while config_rx.changed().await.is_ok() {
            let c = config_rx.borrow_and_update().clone();
            if let Some(change) = dicom_ctx.reload(&c.dicom) {
                tracing::info!("{change}");
            }
        }
    });

    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("serving")]);
    tracing::info!("ready");
    if let Some(period) = sd_notify::watchdog_enabled() {
        tokio::spawn(watchdog(daemon.clone(), period / 2));
    }

    tokio::pin!(shutdown);
    let writer_down = writer_down(daemon.store.clone());
    tokio::pin!(writer_down);
    let mut writer_failed = false;
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&daemon),
            _ = term.recv() => { tracing::info!("SIGTERM received"); break }
            _ = int.recv() => { tracing::info!("SIGINT received"); break }
            () = &mut shutdown => break,
            () = &mut writer_down => {
                // Nothing can be written any more: stop (exit status 1) so that systemd
                // restarts the daemon instead of leaving it up and unable to store.
                tracing::error!("the store writer stopped; shutting down for a restart");
                writer_failed = true;
                break
            }
        }
    }

    notify(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Status("draining")]);
    let grace = Duration::from_secs(daemon.config().lifecycle.shutdown_grace_secs);
    tracing::info!(grace_secs = grace.as_secs(), in_flight = daemon.tasks.len(), "draining");
    token.cancel();
    daemon.tasks.close();
    if tokio::time::timeout(grace, daemon.tasks.wait()).await.is_err() {
        tracing::warn!(
            unfinished = daemon.tasks.len(),
            "drain deadline passed; unfinished work is rolled back"
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), admin_task).await;
    // Read audit records still waiting for their batch are written before the store closes.
    fhir_ctx.flush_audits().await;
    let store = daemon.store.clone();
    tokio::task::spawn_blocking(move || store.close()).await.map_err(std::io::Error::other)?;
    if writer_failed {
        return Err(std::io::Error::other("the store writer stopped").into());
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves when the store's writer thread has ended although nobody closed the store.
async fn writer_down(store: Arc<crate::store::Store>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if !store.writer_alive() {
            return;
        }
    }
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Feeds the systemd watchdog, but only while the store passes its probe (writer alive, a no-op
/// write committed, a read on the probe's own connection): a dead writer or a wedged store stops
/// the pings and systemd restarts us.
async fn watchdog(daemon: Arc<Daemon>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if daemon.shutdown.is_cancelled() {
            return;
        }
        match tokio::time::timeout(every, daemon.store.probe()).await {
            Ok(Ok(())) => notify(&[sd_notify::NotifyState::Watchdog]),
            Ok(Err(why)) => tracing::error!(%why, "store unhealthy; withholding watchdog ping"),
            Err(_) => tracing::error!("store probe timed out; withholding watchdog ping"),
        }
    }
}

/// SIGHUP: re-read the config file, apply what can be applied live, log every change.
fn reload(daemon: &Daemon) {
    let mono = sd_notify::NotifyState::monotonic_usec_now();
    match mono {
        Ok(m) => notify(&[sd_notify::NotifyState::Reloading, m]),
        Err(_) => notify(&[sd_notify::NotifyState::Reloading]),
    }
    if let Some(v) = &daemon.fhir_verifier {
        match v.reload() {
            Ok(n) => tracing::info!(keys = n, "JWKS re-read"),
            Err(e) => tracing::error!(error = %e, "JWKS reload refused; keeping the previous keys"),
        }
    }
    let old = daemon.config();
    match config::load(daemon.config_path.as_deref()) {
        Err(e) => tracing::error!(error = %e, "reload refused; keeping the running configuration"),
        Ok(new) => {
            let effective = apply_reloadable(&old, &new);
            if effective.log.level != old.log.level
                && let Some(log) = &daemon.log
                && let Err(e) = log.set_level(&effective.log.level)
            {
                tracing::error!(error = %e, "cannot apply log.level");
            }
            let state_dir = effective.state_dir();
            let tls_paths = TlsPaths::resolve(&effective.tls, &state_dir);
            match daemon.tls.reload(tls_paths) {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload failed; keeping the old certificate")
                }
            }
            daemon.store.space().set_policy(space_policy(&effective));
            let effective = Arc::new(effective);
            *daemon.config.write().expect("config lock") = effective.clone();
            daemon.config_tx.send_replace(effective);
            tracing::info!("configuration reloaded");
        }
    }
    notify(&[sd_notify::NotifyState::Ready]);
}

/// The free-space limits of a configuration, for the store's space gate.
pub fn space_policy(c: &Config) -> crate::store::space::SpacePolicy {
    crate::store::space::SpacePolicy::from_config(&c.storage, c.critical_free())
}

/// Returns `new` with every non-reloadable setting kept at its `old` value, logging each change.
pub fn apply_reloadable(old: &Config, new: &Config) -> Config {
    let as_table = |c: &Config| match toml::Value::try_from(c) {
        Ok(toml::Value::Table(t)) => t,
        _ => unreachable!("config serializes to a table"),
    };
    let old_t = as_table(old);
    let mut new_t = as_table(new);
    for (section, new_keys) in new_t.iter_mut() {
        let (Some(new_keys), Some(old_keys)) =
            (new_keys.as_table_mut(), old_t.get(section).and_then(|v| v.as_table()))
        else {
            continue;
        };
        for (key, value) in new_keys.iter_mut() {
            let old_value = &old_keys[key.as_str()];
            if value == old_value {
                continue;
            }
            let name = format!("{section}.{key}");
            if RELOADABLE.contains(&name.as_str()) {
                tracing::info!(setting = %name, old = %old_value, new = %value, "setting changed");
            } else {
                tracing::warn!(setting = %name, old = %old_value, new = %value,
                    "setting changed but needs a restart; keeping the running value");
                *value = old_value.clone();
            }
        }
    }
    use serde::Deserialize;
    Config::deserialize(toml::Value::Table(new_t)).expect("merged config is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_applies_only_reloadable_settings() {
        let old = Config::default();
        let mut new = Config::default();
        new.log.level = "debug".into();
        new.admin.listen = "127.0.0.1:1".parse().unwrap();
        new.admin.min_free_disk_mb = 5;
        let eff = apply_reloadable(&old, &new);
        assert_eq!(eff.log.level, "debug");
        assert_eq!(eff.admin.min_free_disk_mb, 5);
        assert_eq!(eff.admin.listen, old.admin.listen);
    }
}
