//! Typed configuration: one TOML file, `HMS_EDGE_<SECTION>_<KEY>` environment overrides, and a
//! documented default for every setting.
//!
//! Parsing is a pure function ([`parse`]) of the file text and the environment, so it is unit-tested
//! without touching the disk. Unknown keys and invalid values are refused with the key's name and the
//! reason. `config/edge.toml` is the documented example and must equal [`Config::default`]; a test
//! in this module proves it.
//!
//! No secret is ever held in this structure: secrets are *paths* to 0600 files or systemd credentials
//! and are read by [`crate::keys`].

pub mod fsync;
pub mod keys;
pub mod logging;
pub mod space;

pub use space::SpaceLimit;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the packaged daemon looks for its configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hms-edge/edge.toml";
/// Environment variable naming another config file (used by `hms-edge` and tests).
pub const CONFIG_PATH_ENV: &str = "HMS_EDGE_CONFIG";
/// Prefix of the environment overrides: `HMS_EDGE_ADMIN_LISTEN=0.0.0.0:9464`.
pub const ENV_PREFIX: &str = "HMS_EDGE_";

/// Development state folder used when neither the config nor systemd (`$STATE_DIRECTORY`) names one.
pub const DEFAULT_DEV_STATE_DIR: &str = "hms-edge-data";
/// Tenant of a development box. A packaged box must set its real tenant.
pub const DEFAULT_TENANT_ID: &str = "dev-tenant";
/// Site name of a development box.
pub const DEFAULT_SITE_ID: &str = "dev-site";
/// Identifier system for DICOM PatientIDs of a development box.
pub const DEFAULT_PATIENT_ID_SYSTEM: &str = "urn:hms-edge:dev-site:patient-id";
/// Default log filter (tracing `EnvFilter` syntax).
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Admin listener: health, readiness, metrics. Loopback only by default.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
/// At most this many writes share one commit + fsync.
pub const DEFAULT_GROUP_COMMIT_MAX_BATCH: u32 = 512;
/// SQLCipher page cache of the writer connection, KiB. The writer's cache stays valid between
/// its transactions (no other connection writes), so it carries the hot index pages of a load.
pub const DEFAULT_DB_CACHE_KIB: u32 = 32 * 1024;
/// SQLCipher page cache of each reader connection, KiB. Small on purpose: in WAL mode every
/// commit (a write, a batch of read audit events) empties the readers' caches, so a reader
/// cache only lives for tens of milliseconds; a large one mostly costs memory.
pub const DEFAULT_DB_READER_CACHE_KIB: u32 = 4 * 1024;
/// Read-only connections kept open for concurrent readers.
pub const DEFAULT_DB_READERS: u32 = 4;
/// FHIR HTTPS listener. Loopback only by default; a packaged box opens it to the LAN.
pub const DEFAULT_FHIR_LISTEN: &str = "127.0.0.1:8443";
/// Largest FHIR request body (a transaction Bundle of a whole patient is a few MiB).
pub const DEFAULT_FHIR_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Concurrent FHIR connections; more wait in the accept queue.
pub const DEFAULT_FHIR_MAX_CONNECTIONS: u32 = 512;
/// Clock skew tolerated when checking token times.
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 60;
/// Token claim naming the tenant.
pub const DEFAULT_TENANT_CLAIM: &str = "tenant";
/// Graceful drain deadline after SIGTERM; systemd's `TimeoutStopSec` must be longer.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 20;
/// Our DICOM Application Entity title (called AE title modalities must use).
pub const DEFAULT_DICOM_AE_TITLE: &str = "HMS-EDGE";
/// DICOM listener (plain TCP). Loopback in development; a packaged box listens on the LAN.
pub const DEFAULT_DICOM_LISTEN: &str = "127.0.0.1:11112";
/// DICOM TLS listener (PS3.15 secure transport connection profile, port 2762).
pub const DEFAULT_DICOM_TLS_LISTEN: &str = "127.0.0.1:2762";
/// Largest P-DATA-TF PDU we accept (announced as our Maximum Length in A-ASSOCIATE-AC).
pub const DEFAULT_DICOM_MAX_PDU_BYTES: u32 = 128 * 1024;
/// Associations served at the same time; further callers wait in the kernel's accept queue.
pub const DEFAULT_DICOM_MAX_ASSOCIATIONS: u32 = 32;
/// ARTIM: seconds a new connection gets to send its A-ASSOCIATE-RQ (and a released one to close).
pub const DEFAULT_DICOM_ARTIM_TIMEOUT_SECS: u64 = 30;
/// Seconds an established association may stay silent (also the limit for one PDU to arrive).
pub const DEFAULT_DICOM_IDLE_TIMEOUT_SECS: u64 = 120;
/// Most C-FIND matches returned for one query (the rest is refused with status A700).
pub const DEFAULT_DICOM_MAX_FIND_RESULTS: u32 = 10_000;
/// Port of a `dicom.peers` entry used as a C-MOVE destination when it names none (plain DICOM).
pub const DEFAULT_DICOM_PEER_PORT: u16 = 11112;
/// Port of a `dicom.peers` entry with `tls = true` that names none (PS3.15 DICOM-TLS port).
pub const DEFAULT_DICOM_PEER_TLS_PORT: u16 = 2762;
/// Whether C-MOVE connects to a peer over TLS when its entry does not say.
pub const DEFAULT_DICOM_PEER_TLS: bool = false;
/// Storage Commitment reports go back on the requester's own association unless its `dicom.peers`
/// entry says `commitment_new_association = true` (a requester that releases right after its
/// N-ACTION and listens for the N-EVENT-REPORT on its own port).
pub const DEFAULT_DICOM_PEER_COMMITMENT_NEW_ASSOCIATION: bool = false;
/// Resources per upstream transaction Bundle.
pub const DEFAULT_UPSTREAM_BATCH_SIZE: u32 = 200;
/// Seconds between sync rounds when nothing triggers one sooner.
pub const DEFAULT_UPSTREAM_INTERVAL_SECS: u64 = 10;
/// Seconds one upstream request may take.
pub const DEFAULT_UPSTREAM_TIMEOUT_SECS: u64 = 60;
/// Longest wait between retries while the link is down (exponential backoff with jitter up to it).
pub const DEFAULT_UPSTREAM_MAX_BACKOFF_SECS: u64 = 300;
/// Upstream `_history` entries per page asked for.
pub const DEFAULT_UPSTREAM_PULL_PAGE_SIZE: u32 = 500;
/// Attempts before a change that keeps failing with a client error is parked.
pub const DEFAULT_UPSTREAM_MAX_ATTEMPTS: u32 = 5;
/// Instances per STOW-RS request (one study per request; a bigger study takes several).
pub const DEFAULT_PACS_BATCH_INSTANCES: u32 = 50;
/// MQTT keep-alive, seconds.
pub const DEFAULT_MQTT_KEEP_ALIVE_SECS: u64 = 30;
/// Default seconds between chain anchors (when the log grew).
pub const DEFAULT_CHAIN_ANCHOR_INTERVAL_SECS: u64 = 600;
/// Default number of new leaves that triggers an anchor before the interval is up.
pub const DEFAULT_CHAIN_ANCHOR_EVERY_LEAVES: u64 = 10_000;
/// Default confirmations before an anchor counts.
pub const DEFAULT_CHAIN_CONFIRMATIONS: u64 = 2;
/// Default interval between signed ledger checkpoints, seconds.
pub const DEFAULT_LEDGER_CHECKPOINT_INTERVAL_SECS: u64 = 60;
/// Default high watermark: eviction starts when the state file system is this full.
pub const DEFAULT_STORAGE_HIGH_WATERMARK: SpaceLimit = SpaceLimit::Share(8500);
/// Default low watermark: eviction stops when the state file system is this full.
pub const DEFAULT_STORAGE_LOW_WATERMARK: SpaceLimit = SpaceLimit::Share(7500);
/// Default critical floor: with less free space, images are refused (C-STORE A700, STOW-RS 507).
pub const DEFAULT_STORAGE_CRITICAL_FREE: SpaceLimit = SpaceLimit::Bytes(1 << 30);
/// Default FHIR reserve: with less free space, FHIR writes are refused too (507).
pub const DEFAULT_STORAGE_RECORDS_RESERVE: SpaceLimit = SpaceLimit::Bytes(256 << 20);
/// Default protection window: a study received or retrieved within it is never evicted (7 days).
pub const DEFAULT_STORAGE_PROTECT_SECS: u64 = 7 * 24 * 3600;
/// Default interval between two looks at the disk by the eviction task, seconds.
pub const DEFAULT_STORAGE_CHECK_INTERVAL_SECS: u64 = 30;
/// Default wait of a retrieve for evicted instances to come back from the cloud PACS, seconds.
pub const DEFAULT_STORAGE_RECALL_TIMEOUT_SECS: u64 = 120;
/// Default lead of prefetch: priors of orders scheduled within this many seconds come back (4 h).
pub const DEFAULT_STORAGE_PREFETCH_LEAD_SECS: u64 = 4 * 3600;
/// Default look-back of prefetch: priors dated within this many days (3 years).
pub const DEFAULT_STORAGE_PREFETCH_LOOKBACK_DAYS: u64 = 3 * 365;

/// The whole daemon configuration. Field docs are the reference; `config/edge.toml` repeats them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub site: SiteConfig,
    pub paths: PathsConfig,
    pub keys: KeysConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub storage: StorageConfig,
    pub tls: TlsConfig,
    pub fhir: FhirConfig,
    pub lifecycle: LifecycleConfig,
    pub dicom: DicomConfig,
    pub internal: InternalConfig,
    pub upstream: UpstreamConfig,
    pub pacs: PacsConfig,
    pub mqtt: MqttConfig,
    pub ledger: LedgerConfig,
    pub chain: ChainConfig,
}

/// Who this box is in the multi-tenant cloud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiteConfig {
    /// Tenant id of this hospital; every upstream call carries it and foreign tenants are refused.
    pub tenant_id: String,
    /// Name of this site (used in `meta.source` and logs).
    pub site_id: String,
    /// Identifier system of the DICOM PatientID values at this site: a study's ImagingStudy is
    /// linked to the Patient with identifier `<this system>|<PatientID>` (or to a placeholder
    /// Patient created with it).
    pub patient_id_system: String,
}

impl Default for SiteConfig {
    fn default() -> Self {
        Self {
            tenant_id: DEFAULT_TENANT_ID.into(),
            site_id: DEFAULT_SITE_ID.into(),
            patient_id_system: DEFAULT_PATIENT_ID_SYSTEM.into(),
        }
    }
}

/// Filesystem locations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// State folder (database, blobs, development keys). Empty: `$STATE_DIRECTORY` when run by
    /// systemd, otherwise `./hms-edge-data`.
    pub state_dir: PathBuf,
}

/// Where the master key comes from. The key itself never appears in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Master key file (32 raw bytes or 64 hex digits, mode 0600 or stricter). Empty:
    /// `$CREDENTIALS_DIRECTORY/master-key` when systemd passes credentials, otherwise
    /// `<state_dir>/master.key`.
    pub master_key_file: PathBuf,
    /// Create a random master key (0600) on first run when none exists. Development convenience;
    /// packages create the key at install time and set this to false.
    pub generate_if_missing: bool,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self { master_key_file: PathBuf::new(), generate_if_missing: true }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Filter in tracing `EnvFilter` syntax, e.g. `info` or `info,hms_edge::store=debug`.
    /// Reloaded on SIGHUP.
    pub level: String,
    /// `auto` (journald when `$JOURNAL_STREAM` is set, else stderr), `journald` or `stderr`.
    pub target: LogTarget,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: DEFAULT_LOG_LEVEL.into(), target: LogTarget::Auto }
    }
}

/// Log destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    Auto,
    Journald,
    Stderr,
}

/// Admin listener (health, readiness, Prometheus metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener. Keep it on loopback: it is not authenticated.
    pub listen: SocketAddr,
    /// Deprecated: the critical floor in MiB, from before `storage.critical_free`. 0 (the
    /// default): unset, `storage.critical_free` applies; otherwise it overrides it.
    pub min_free_disk_mb: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default address"),
            min_free_disk_mb: 0,
        }
    }
}

/// Encrypted store tuning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Most writes folded into one transaction and one fsync by the group committer.
    pub group_commit_max_batch: u32,
    /// SQLCipher page cache of the writer connection, KiB.
    pub db_cache_kib: u32,
    /// SQLCipher page cache of each reader connection, KiB.
    pub db_reader_cache_kib: u32,
    /// Read-only database connections for concurrent readers.
    pub db_readers: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            group_commit_max_batch: DEFAULT_GROUP_COMMIT_MAX_BATCH,
            db_cache_kib: DEFAULT_DB_CACHE_KIB,
            db_reader_cache_kib: DEFAULT_DB_READER_CACHE_KIB,
            db_readers: DEFAULT_DB_READERS,
        }
    }
}

/// TLS certificate for the LAN listeners (FHIR HTTPS, DICOM TLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. Empty: `<state_dir>/tls/cert.pem`. Reloaded on SIGHUP.
    pub cert_file: PathBuf,
    /// PEM private key (0600). Empty: `<state_dir>/tls/key.pem`. Reloaded on SIGHUP.
    pub key_file: PathBuf,
    /// Generate a self-signed certificate for localhost on first run when none exists.
    pub generate_self_signed: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self { cert_file: PathBuf::new(), key_file: PathBuf::new(), generate_self_signed: true }
    }
}

/// The FHIR R4 API for ward workstations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FhirConfig {
    /// Address of the FHIR HTTPS listener (base URL `https://<host>:<port>/fhir`).
    pub listen: SocketAddr,
    /// Largest request body in bytes; larger requests get 413 and change nothing.
    pub max_body_bytes: u64,
    /// Concurrent connections served.
    pub max_connections: u32,
    /// `none` (development only: every caller may do everything; refused unless `listen` is a
    /// loopback address) or `jwt` (bearer tokens checked offline against `jwks_file`).
    pub auth: FhirAuth,
    /// Expected `iss` of tokens (the cloud identity provider).
    pub jwt_issuer: String,
    /// Expected `aud` of tokens.
    pub jwt_audience: String,
    /// JWKS of the issuer, cached on disk (kept fresh by the agent). Read at start.
    pub jwks_file: PathBuf,
    /// Clock skew tolerated on `exp`/`nbf`, seconds.
    pub jwt_leeway_secs: u64,
    /// Claim carrying the tenant id; it must equal `site.tenant_id`.
    pub tenant_claim: String,
    /// PEM file of the CA that issues the client certificates of fixed workstations (mTLS).
    /// Empty: no client certificates are asked for. Only with `auth = "jwt"`.
    pub client_ca_file: PathBuf,
    /// Workstation identities: the subject CN of a client certificate issued by
    /// `client_ca_file` → the SMART scopes it is granted (e.g. `"user/*.rs"`). A certificate
    /// whose CN is not listed grants nothing; a bearer token, when sent, always takes precedence.
    pub client_certs: std::collections::BTreeMap<String, String>,
}

/// How FHIR callers are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FhirAuth {
    None,
    Jwt,
}

impl Default for FhirConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_FHIR_LISTEN.parse().expect("valid default address"),
            max_body_bytes: DEFAULT_FHIR_MAX_BODY_BYTES,
            max_connections: DEFAULT_FHIR_MAX_CONNECTIONS,
            auth: FhirAuth::None,
            jwt_issuer: String::new(),
            jwt_audience: String::new(),
            jwks_file: PathBuf::new(),
            jwt_leeway_secs: DEFAULT_JWT_LEEWAY_SECS,
            tenant_claim: DEFAULT_TENANT_CLAIM.into(),
            client_ca_file: PathBuf::new(),
            client_certs: Default::default(),
        }
    }
}

/// The disk lifecycle of the state file system: watermarks for evicting images the cloud PACS
/// holds, and the floors below which writes are refused with a clear answer (see the daemon's
/// `disk` and `dicom::evict`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Used space (share of the file system or bytes) above which studies are evicted.
    pub high_watermark: SpaceLimit,
    /// Used space at which eviction stops.
    pub low_watermark: SpaceLimit,
    /// Free space below which images are refused (C-STORE A700, STOW-RS 507) and `/readyz` fails.
    pub critical_free: SpaceLimit,
    /// Free space below which FHIR writes are refused too (507); smaller than `critical_free`, so
    /// charts can still be written for a while after images stop.
    pub records_reserve: SpaceLimit,
    /// Evict studies whose every instance the cloud PACS confirmed (false: never evict).
    pub eviction: bool,
    /// A study received or retrieved less than this many seconds ago is never evicted.
    pub protect_secs: u64,
    /// Seconds between two looks at the disk by the eviction task (it also wakes when a write
    /// finds the disk above the high watermark).
    pub check_interval_secs: u64,
    /// How long a retrieve (C-GET, C-MOVE, WADO-RS) of evicted instances waits for them to come
    /// back from the cloud PACS (through the agent) before it fails.
    pub recall_timeout_secs: u64,
    /// Prefetch: the evicted prior studies of the patient of an active order scheduled within
    /// this many seconds are fetched back from the cloud PACS ahead of time (0: no prefetch).
    pub prefetch_lead_secs: u64,
    /// Prefetch: only priors dated within this many days.
    pub prefetch_lookback_days: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            high_watermark: DEFAULT_STORAGE_HIGH_WATERMARK,
            low_watermark: DEFAULT_STORAGE_LOW_WATERMARK,
            critical_free: DEFAULT_STORAGE_CRITICAL_FREE,
            records_reserve: DEFAULT_STORAGE_RECORDS_RESERVE,
            eviction: true,
            protect_secs: DEFAULT_STORAGE_PROTECT_SECS,
            check_interval_secs: DEFAULT_STORAGE_CHECK_INTERVAL_SECS,
            recall_timeout_secs: DEFAULT_STORAGE_RECALL_TIMEOUT_SECS,
            prefetch_lead_secs: DEFAULT_STORAGE_PREFETCH_LEAD_SECS,
            prefetch_lookback_days: DEFAULT_STORAGE_PREFETCH_LOOKBACK_DAYS,
        }
    }
}

/// Start and stop behaviour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// Seconds in-flight work gets to finish after SIGTERM before it is rolled back.
    pub shutdown_grace_secs: u64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self { shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS }
    }
}

/// DICOM receiver (C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE SCP). See `docs/dicom-conformance.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DicomConfig {
    /// Our AE title. Callers must address it (Called AE Title); 1-16 characters, no backslash.
    pub ae_title: String,
    /// Address of the plain DICOM listener.
    pub listen: SocketAddr,
    /// Serve DICOM over TLS (certificate from `[tls]`) on `tls_listen`.
    pub tls_enabled: bool,
    /// Address of the DICOM TLS listener.
    pub tls_listen: SocketAddr,
    /// PEM file of CA certificates. Empty: TLS callers need no client certificate. Set: callers
    /// must present a certificate issued by one of these CAs.
    pub tls_client_ca_file: PathBuf,
    /// Largest PDU we accept, bytes (4096-1048576). A bigger PDU aborts the association.
    pub max_pdu_bytes: u32,
    /// Associations served concurrently.
    pub max_associations: u32,
    /// Seconds to wait for the A-ASSOCIATE-RQ after connect (ARTIM timer).
    pub artim_timeout_secs: u64,
    /// Seconds an association may stay silent, and the most one PDU may take to arrive.
    pub idle_timeout_secs: u64,
    /// Same SOP Instance UID with different content: `keep-first` refuses the newcomer with
    /// status 0111 (Duplicate SOP Instance); `keep-both` stores it as a new version. Identical
    /// content is always a success without a second copy.
    pub duplicate_policy: DuplicatePolicy,
    /// Most C-FIND matches per query.
    pub max_find_results: u32,
    /// Accept any calling AE title from a loopback address (development convenience).
    pub accept_loopback_callers: bool,
    /// Calling AE titles allowed to associate, each optionally bound to a source address.
    /// Reloaded on SIGHUP.
    pub peers: Vec<DicomPeer>,
}

impl Default for DicomConfig {
    fn default() -> Self {
        Self {
            ae_title: DEFAULT_DICOM_AE_TITLE.into(),
            listen: DEFAULT_DICOM_LISTEN.parse().expect("valid default address"),
            tls_enabled: true,
            tls_listen: DEFAULT_DICOM_TLS_LISTEN.parse().expect("valid default address"),
            tls_client_ca_file: PathBuf::new(),
            max_pdu_bytes: DEFAULT_DICOM_MAX_PDU_BYTES,
            max_associations: DEFAULT_DICOM_MAX_ASSOCIATIONS,
            artim_timeout_secs: DEFAULT_DICOM_ARTIM_TIMEOUT_SECS,
            idle_timeout_secs: DEFAULT_DICOM_IDLE_TIMEOUT_SECS,
            duplicate_policy: DuplicatePolicy::KeepFirst,
            max_find_results: DEFAULT_DICOM_MAX_FIND_RESULTS,
            accept_loopback_callers: true,
            peers: Vec::new(),
        }
    }
}

/// The internal API between hms-edged and hms-edge-agent (a Unix socket, never TCP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct InternalConfig {
    /// Socket path. Empty: `$RUNTIME_DIRECTORY/agent.sock` under systemd
    /// (/run/hms-edge/agent.sock), otherwise `<state_dir>/agent.sock`.
    pub socket: PathBuf,
}

/// Upstream FHIR server of the tenant (read by hms-edge-agent only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of the cloud FHIR server. Empty: FHIR sync off (the box works offline). In
    /// `path` tenant mode it must contain `{tenant}`, e.g. "https://cloud.example/{tenant}/fhir".
    pub fhir_base_url: String,
    /// How the tenant travels: `path` (`{tenant}` in the URL) or `header` (`X-Tenant-ID`).
    pub tenant_mode: TenantMode,
    /// OAuth2 token endpoint (client credentials). Empty: no token is sent (test clusters only).
    pub token_url: String,
    /// OAuth2 client id of this site.
    pub client_id: String,
    /// File holding the client secret (mode 0600 or stricter). Empty: the systemd credential
    /// `upstream-client-secret`. Never put the secret itself here.
    pub client_secret_file: PathBuf,
    /// OAuth2 scope to ask for; empty: none.
    pub scope: String,
    /// PEM CA certificates trusted for upstream TLS besides the system roots (a site's private CA).
    pub ca_file: PathBuf,
    /// Resources per transaction Bundle pushed.
    pub batch_size: u32,
    /// Edge and upstream changed the same resource: `server-wins`, `client-wins` or `manual`.
    pub conflict_policy: hms_edge_wire::api::ConflictPolicy,
    /// Seconds between sync rounds (a round also starts on `sync-now` and after local changes).
    pub interval_secs: u64,
    /// Seconds one upstream request may take.
    pub request_timeout_secs: u64,
    /// Longest backoff while the link is down, seconds.
    pub max_backoff_secs: u64,
    /// `_history` entries per page asked for when pulling.
    pub pull_page_size: u32,
    /// Attempts before a change that upstream keeps refusing (4xx) is parked for site IT.
    pub max_attempts: u32,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            fhir_base_url: String::new(),
            tenant_mode: TenantMode::Path,
            token_url: String::new(),
            client_id: String::new(),
            client_secret_file: PathBuf::new(),
            scope: String::new(),
            ca_file: PathBuf::new(),
            batch_size: DEFAULT_UPSTREAM_BATCH_SIZE,
            conflict_policy: hms_edge_wire::api::ConflictPolicy::ServerWins,
            interval_secs: DEFAULT_UPSTREAM_INTERVAL_SECS,
            request_timeout_secs: DEFAULT_UPSTREAM_TIMEOUT_SECS,
            max_backoff_secs: DEFAULT_UPSTREAM_MAX_BACKOFF_SECS,
            pull_page_size: DEFAULT_UPSTREAM_PULL_PAGE_SIZE,
            max_attempts: DEFAULT_UPSTREAM_MAX_ATTEMPTS,
        }
    }
}

/// How the tenant is named on upstream requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TenantMode {
    Path,
    Header,
}

/// Cloud PACS that received studies are forwarded to (read by hms-edge-agent only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PacsConfig {
    /// How instances travel: `dicomweb` (STOW-RS, checked with QIDO-RS) or `cstore` (C-STORE SCU,
    /// checked with C-FIND).
    pub mode: PacsMode,
    /// DICOMweb base URL (STOW-RS and QIDO-RS), e.g. "https://pacs.example/dicom-web". Empty (in
    /// `dicomweb` mode): forwarding off (instances stay in the outbox until it is set).
    pub dicomweb_url: String,
    /// The PACS's DICOM address for `cstore` mode, "AE_TITLE@host:port". Empty: forwarding off.
    pub dicom_address: String,
    /// Our calling AE title in `cstore` mode.
    pub calling_ae_title: String,
    /// Instances per STOW-RS request.
    pub batch_instances: u32,
    /// Check each instance's arrival with QIDO-RS before acknowledging it.
    pub verify: bool,
}

impl Default for PacsConfig {
    fn default() -> Self {
        Self {
            mode: PacsMode::Dicomweb,
            dicomweb_url: String::new(),
            dicom_address: String::new(),
            calling_ae_title: DEFAULT_DICOM_AE_TITLE.into(),
            batch_instances: DEFAULT_PACS_BATCH_INSTANCES,
            verify: true,
        }
    }
}

/// How the agent forwards instances to the PACS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PacsMode {
    Dicomweb,
    Cstore,
}

/// Message broker for events (read by hms-edge-agent only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker URL: "mqtt://host:1883" or "mqtts://host:8883". Empty: events off (they wait in
    /// the outbox).
    pub url: String,
    /// MQTT client id; empty: "hms-edge-<site_id>".
    pub client_id: String,
    /// PEM CA certificates for the broker's TLS certificate (mqtts); empty: system roots.
    pub ca_file: PathBuf,
    /// Client certificate and key (PEM, key 0600) for brokers that require one.
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    /// Keep-alive, seconds.
    pub keep_alive_secs: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            client_id: String::new(),
            ca_file: PathBuf::new(),
            client_cert_file: PathBuf::new(),
            client_key_file: PathBuf::new(),
            keep_alive_secs: DEFAULT_MQTT_KEEP_ALIVE_SECS,
        }
    }
}

/// Integrity ledger: the RFC 6962 Merkle log of audit events and record commitments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Origin line of the signed checkpoints (the log's name). Empty:
    /// "hms-edge/<tenant_id>/<site_id>".
    pub origin: String,
    /// Seconds between signed checkpoints (made only when the log grew; also made on demand by
    /// `$verify`). Fully offline.
    pub checkpoint_interval_secs: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            origin: String::new(),
            checkpoint_interval_secs: DEFAULT_LEDGER_CHECKPOINT_INTERVAL_SECS,
        }
    }
}

/// Anchoring of ledger checkpoints on an Ethereum chain (read by hms-edge-agent only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChainConfig {
    /// Ethereum JSON-RPC URL. Empty: anchoring off (proofs say `pending`).
    pub rpc_url: String,
    /// Address of the LedgerAnchor contract (`hms-edge-agent chain deploy` prints it). Empty:
    /// anchoring off.
    pub contract: String,
    /// File with the anchoring account's secp256k1 private key (64 hex digits, mode 0600). Empty:
    /// the systemd credential `chain-key` (`$CREDENTIALS_DIRECTORY/chain-key`).
    pub key_file: PathBuf,
    /// Anchor the newest checkpoint at most this often (seconds), when the log grew.
    pub anchor_interval_secs: u64,
    /// …or as soon as this many leaves were added since the last anchor.
    pub anchor_every_leaves: u64,
    /// Blocks (including the anchor's own) before an anchor counts as confirmed.
    pub confirmations: u64,
}

impl Default for ChainConfig {
    fn default() -> Self {
        Self {
            rpc_url: String::new(),
            contract: String::new(),
            key_file: PathBuf::new(),
            anchor_interval_secs: DEFAULT_CHAIN_ANCHOR_INTERVAL_SECS,
            anchor_every_leaves: DEFAULT_CHAIN_ANCHOR_EVERY_LEAVES,
            confirmations: DEFAULT_CHAIN_CONFIRMATIONS,
        }
    }
}

impl Config {
    /// The ledger's origin line after the default.
    pub fn ledger_origin(&self) -> String {
        if self.ledger.origin.is_empty() {
            format!("hms-edge/{}/{}", self.site.tenant_id, self.site.site_id)
        } else {
            self.ledger.origin.clone()
        }
    }
}

/// What happens when an instance arrives whose SOP Instance UID is stored with other content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DuplicatePolicy {
    /// Keep the stored instance; refuse the new one (status 0111).
    KeepFirst,
    /// Store the new content as another version; export returns the newest.
    KeepBoth,
}

/// One DICOM peer: a modality allowed to associate with us and, when it has an address, a
/// C-MOVE destination (its AE title is the Move Destination).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomPeer {
    /// Its calling AE title (and its Called AE Title when we send to it).
    pub ae_title: String,
    /// Source IP address it must connect from; empty: any address. Also where C-MOVE sends to:
    /// a peer without an address is no move destination.
    #[serde(default)]
    pub address: String,
    /// Port C-MOVE connects to. Absent: [`DEFAULT_DICOM_PEER_PORT`], or
    /// [`DEFAULT_DICOM_PEER_TLS_PORT`] with `tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// C-MOVE connects over TLS 1.2+ (the peer's certificate must be valid for its IP address
    /// under the system's trusted CAs). Absent: [`DEFAULT_DICOM_PEER_TLS`].
    #[serde(default = "default_peer_tls")]
    pub tls: bool,
    /// Storage Commitment N-EVENT-REPORTs to this AE go on a new association we open to its
    /// address and port (as for C-MOVE), not on the association of its N-ACTION. Absent:
    /// [`DEFAULT_DICOM_PEER_COMMITMENT_NEW_ASSOCIATION`].
    #[serde(default = "default_peer_commitment_new_association")]
    pub commitment_new_association: bool,
}

fn default_peer_commitment_new_association() -> bool {
    DEFAULT_DICOM_PEER_COMMITMENT_NEW_ASSOCIATION
}

fn default_peer_tls() -> bool {
    DEFAULT_DICOM_PEER_TLS
}

/// Where C-MOVE sends to: a peer's address, port and whether over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveDestination {
    pub addr: SocketAddr,
    pub tls: bool,
}

impl DicomPeer {
    /// An entry with an AE title and a source address (empty: any) and the default port and TLS.
    pub fn new(ae_title: &str, address: &str) -> DicomPeer {
        DicomPeer {
            ae_title: ae_title.into(),
            address: address.into(),
            port: None,
            tls: DEFAULT_DICOM_PEER_TLS,
            commitment_new_association: DEFAULT_DICOM_PEER_COMMITMENT_NEW_ASSOCIATION,
        }
    }

    /// The C-MOVE destination of this entry, with the documented defaults applied; `None` when it
    /// has no (valid) address.
    pub fn move_destination(&self) -> Option<MoveDestination> {
        let ip: std::net::IpAddr = self.address.trim().parse().ok()?;
        let default_port =
            if self.tls { DEFAULT_DICOM_PEER_TLS_PORT } else { DEFAULT_DICOM_PEER_PORT };
        Some(MoveDestination {
            addr: SocketAddr::new(ip, self.port.unwrap_or(default_port)),
            tls: self.tls,
        })
    }
}

/// Why a configuration was refused. The message always names the key (or variable) and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("invalid config value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

/// Parses a config text plus environment overrides into a validated [`Config`].
///
/// `origin` names the file in error messages. `env` is the process environment (pass
/// `std::env::vars()`); only `HMS_EDGE_*` variables are looked at, and `HMS_EDGE_CONFIG` is skipped.
pub fn parse(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let origin_note = if origin.is_empty() { String::new() } else { format!(" in {origin}") };
    let mut table: toml::Table = toml::from_str(text)
        .map_err(|e| ConfigError::Parse { origin: origin_note.clone(), message: e.to_string() })?;
    apply_env_overrides(&mut table, env)?;
    let config: Config = Config::deserialize(toml::Value::Table(table))
        .map_err(|e| ConfigError::Parse { origin: origin_note, message: e.to_string() })?;
    config.validate()?;
    Ok(config)
}

/// Loads the config file at `path` (or the embedded defaults when `path` is `None`) with the
/// process environment applied.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|source| ConfigError::Read { path: p.to_owned(), source })?;
            parse(&text, &p.display().to_string(), std::env::vars())
        }
        None => parse("", "", std::env::vars()),
    }
}

/// The config file to use: the explicit one, else `$HMS_EDGE_CONFIG`, else the packaged path when it
/// exists, else none (embedded defaults).
pub fn resolve_path(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit
        .or_else(|| std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from))
        .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()))
}

/// Applies `HMS_EDGE_<SECTION>_<KEY>=value`. The value is typed after the setting's default: a
/// string setting takes the text as is, numbers and booleans must parse.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => unreachable!("Config serializes to a table"),
    };
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != CONFIG_PATH_ENV)
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        let found = defaults.iter().find_map(|(section, keys)| {
            let key = rest.strip_prefix(section.as_str())?.strip_prefix('_')?;
            let default = keys.as_table()?.get(key)?;
            Some((section.clone(), key.to_owned(), default.clone()))
        });
        let Some((section, key, default)) = found else {
            return Err(ConfigError::Env { var, reason: "no such setting".into() });
        };
        let value = typed_like(&default, &raw)
            .map_err(|reason| ConfigError::Env { var: var.clone(), reason })?;
        let entry =
            table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = entry.as_table_mut() else {
            return Err(ConfigError::Invalid { key: section, reason: "must be a table".into() });
        };
        section_table.insert(key, value);
    }
    Ok(())
}

fn typed_like(default: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    Ok(match default {
        toml::Value::String(_) => toml::Value::String(raw.to_owned()),
        toml::Value::Integer(_) => toml::Value::Integer(
            raw.trim().parse().map_err(|_| format!("expected an integer, got {raw:?}"))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(
            raw.trim().parse().map_err(|_| format!("expected true or false, got {raw:?}"))?,
        ),
        _ => {
            let doc: toml::Table = toml::from_str(&format!("v = {raw}"))
                .map_err(|_| format!("expected a TOML value, got {raw:?}"))?;
            doc["v"].clone()
        }
    })
}

impl Config {
    /// Checks what serde's types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| {
            Err(ConfigError::Invalid { key: key.into(), reason: reason.into() })
        };
        if !valid_id(&self.site.tenant_id) {
            return invalid("site.tenant_id", "1-64 characters of A-Z a-z 0-9 . _ - required");
        }
        if !valid_id(&self.site.site_id) {
            return invalid("site.site_id", "1-64 characters of A-Z a-z 0-9 . _ - required");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            return invalid("log.level", &e.to_string());
        }
        if self.ledger.checkpoint_interval_secs == 0 {
            return invalid("ledger.checkpoint_interval_secs", "must be at least 1");
        }
        if self.ledger.origin.contains('\n') || self.ledger.origin.contains('+') {
            return invalid("ledger.origin", "must be one line without '+'");
        }
        if self.chain.anchor_interval_secs == 0 || self.chain.confirmations == 0 {
            return invalid(
                "chain.anchor_interval_secs",
                "anchor_interval_secs and confirmations must be at least 1",
            );
        }
        let st = &self.storage;
        let same_kind = matches!(
            (st.high_watermark, st.low_watermark),
            (SpaceLimit::Share(_), SpaceLimit::Share(_))
                | (SpaceLimit::Bytes(_), SpaceLimit::Bytes(_))
        );
        if same_kind && st.low_watermark.bytes_of(1 << 40) >= st.high_watermark.bytes_of(1 << 40) {
            return invalid("storage.low_watermark", "must be below storage.high_watermark");
        }
        let same_kind = matches!(
            (st.records_reserve, st.critical_free),
            (SpaceLimit::Share(_), SpaceLimit::Share(_))
                | (SpaceLimit::Bytes(_), SpaceLimit::Bytes(_))
        );
        if same_kind && st.records_reserve.bytes_of(1 << 40) > st.critical_free.bytes_of(1 << 40) {
            return invalid("storage.records_reserve", "must not exceed storage.critical_free");
        }
        if st.check_interval_secs == 0 {
            return invalid("storage.check_interval_secs", "must be at least 1");
        }
        if self.store.group_commit_max_batch == 0 {
            return invalid("store.group_commit_max_batch", "must be at least 1");
        }
        if self.store.db_readers == 0 || self.store.db_readers > 64 {
            return invalid("store.db_readers", "must be between 1 and 64");
        }
        if self.fhir.max_body_bytes < 1024 {
            return invalid("fhir.max_body_bytes", "must be at least 1024");
        }
        if self.fhir.max_connections == 0 {
            return invalid("fhir.max_connections", "must be at least 1");
        }
        match self.fhir.auth {
            FhirAuth::None if !self.fhir.listen.ip().is_loopback() => {
                return invalid(
                    "fhir.auth",
                    "\"none\" is only allowed when fhir.listen is a loopback address; use \"jwt\"",
                );
            }
            FhirAuth::Jwt => {
                if self.fhir.jwt_issuer.is_empty() {
                    return invalid("fhir.jwt_issuer", "required when fhir.auth = \"jwt\"");
                }
                if self.fhir.jwt_audience.is_empty() {
                    return invalid("fhir.jwt_audience", "required when fhir.auth = \"jwt\"");
                }
                if self.fhir.jwks_file.as_os_str().is_empty() {
                    return invalid("fhir.jwks_file", "required when fhir.auth = \"jwt\"");
                }
            }
            FhirAuth::None => {}
        }
        if !self.fhir.client_certs.is_empty() && self.fhir.client_ca_file.as_os_str().is_empty() {
            return invalid("fhir.client_certs", "needs fhir.client_ca_file (the issuing CA)");
        }
        if !self.fhir.client_ca_file.as_os_str().is_empty() && self.fhir.auth != FhirAuth::Jwt {
            return invalid("fhir.client_ca_file", "client certificates need fhir.auth = \"jwt\"");
        }
        if self.tls.cert_file.as_os_str().is_empty() != self.tls.key_file.as_os_str().is_empty() {
            return invalid("tls.cert_file", "set both tls.cert_file and tls.key_file, or neither");
        }
        let d = &self.dicom;
        if !valid_ae_title(&d.ae_title) {
            return invalid("dicom.ae_title", "1-16 printable ASCII characters, no backslash");
        }
        if !(4096..=1024 * 1024).contains(&d.max_pdu_bytes) {
            return invalid("dicom.max_pdu_bytes", "must be between 4096 and 1048576");
        }
        if d.max_associations == 0 || d.max_associations > 4096 {
            return invalid("dicom.max_associations", "must be between 1 and 4096");
        }
        if d.artim_timeout_secs == 0 {
            return invalid("dicom.artim_timeout_secs", "must be at least 1");
        }
        if d.idle_timeout_secs == 0 {
            return invalid("dicom.idle_timeout_secs", "must be at least 1");
        }
        if d.max_find_results == 0 {
            return invalid("dicom.max_find_results", "must be at least 1");
        }
        if d.tls_enabled && d.tls_listen == d.listen {
            return invalid("dicom.tls_listen", "must differ from dicom.listen");
        }
        for (i, peer) in d.peers.iter().enumerate() {
            if !valid_ae_title(&peer.ae_title) {
                return invalid(
                    &format!("dicom.peers[{i}].ae_title"),
                    "1-16 printable ASCII characters, no backslash",
                );
            }
            if !peer.address.is_empty() && peer.address.parse::<std::net::IpAddr>().is_err() {
                return invalid(
                    &format!("dicom.peers[{i}].address"),
                    "must be an IP address or empty",
                );
            }
            if peer.port == Some(0) {
                return invalid(&format!("dicom.peers[{i}].port"), "must be between 1 and 65535");
            }
            if peer.port.is_some() && peer.address.is_empty() {
                return invalid(
                    &format!("dicom.peers[{i}].port"),
                    "needs dicom.peers[].address (where to connect)",
                );
            }
        }
        let u = &self.upstream;
        if !u.fhir_base_url.is_empty() {
            if !(u.fhir_base_url.starts_with("https://") || u.fhir_base_url.starts_with("http://"))
            {
                return invalid("upstream.fhir_base_url", "must be an http(s) URL");
            }
            if u.tenant_mode == TenantMode::Path && !u.fhir_base_url.contains("{tenant}") {
                return invalid(
                    "upstream.fhir_base_url",
                    "must contain {tenant} when tenant_mode = \"path\"",
                );
            }
            if !u.token_url.is_empty() && u.client_id.is_empty() {
                return invalid("upstream.client_id", "required when upstream.token_url is set");
            }
        }
        if u.batch_size == 0 || u.batch_size > 5000 {
            return invalid("upstream.batch_size", "must be between 1 and 5000");
        }
        if u.interval_secs == 0 || u.request_timeout_secs == 0 || u.max_backoff_secs == 0 {
            return invalid("upstream.interval_secs", "intervals and timeouts must be at least 1");
        }
        if u.pull_page_size == 0 || u.max_attempts == 0 {
            return invalid("upstream.pull_page_size", "must be at least 1 (and max_attempts too)");
        }
        if !self.pacs.dicom_address.is_empty() {
            let ok = self.pacs.dicom_address.split_once('@').is_some_and(|(ae, addr)| {
                valid_ae_title(ae)
                    && addr.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            });
            if !ok {
                return invalid("pacs.dicom_address", "must be AE_TITLE@host:port");
            }
        }
        if !valid_ae_title(&self.pacs.calling_ae_title) {
            return invalid(
                "pacs.calling_ae_title",
                "1-16 printable ASCII characters, no backslash",
            );
        }
        if self.pacs.batch_instances == 0 {
            return invalid("pacs.batch_instances", "must be at least 1");
        }
        let m = &self.mqtt;
        if !(m.url.is_empty() || m.url.starts_with("mqtt://") || m.url.starts_with("mqtts://")) {
            return invalid("mqtt.url", "must start with mqtt:// or mqtts://");
        }
        if m.client_cert_file.as_os_str().is_empty() != m.client_key_file.as_os_str().is_empty() {
            return invalid(
                "mqtt.client_cert_file",
                "set both client_cert_file and client_key_file",
            );
        }
        Ok(())
    }

    /// The critical floor of free space: `storage.critical_free`, unless the deprecated
    /// `admin.min_free_disk_mb` is set.
    pub fn critical_free(&self) -> SpaceLimit {
        match self.admin.min_free_disk_mb {
            0 => self.storage.critical_free,
            mb => SpaceLimit::Bytes(mb.saturating_mul(1 << 20)),
        }
    }

    /// The state folder after applying the systemd and development fallbacks.
    pub fn state_dir(&self) -> PathBuf {
        if !self.paths.state_dir.as_os_str().is_empty() {
            return self.paths.state_dir.clone();
        }
        match std::env::var_os("STATE_DIRECTORY") {
            // systemd may pass several colon-separated folders; the first is ours.
            Some(dirs) => PathBuf::from(dirs.to_string_lossy().split(':').next().unwrap_or("")),
            None => PathBuf::from(DEFAULT_DEV_STATE_DIR),
        }
    }

    /// Renders the effective configuration as TOML for `hms-edge check-config`.
    /// Nothing in it is secret (keys are referenced by path only).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

/// A DICOM AE title: 1-16 characters of the default repertoire, not only spaces, no backslash.
pub fn valid_ae_title(s: &str) -> bool {
    let t = s.trim();
    !t.is_empty() && s.len() <= 16 && s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn empty_text_gives_defaults() {
        assert_eq!(parse("", "", no_env()).unwrap(), Config::default());
    }

    /// The example file must spell out every setting with its default value.
    #[test]
    fn example_config_equals_defaults() {
        let text = include_str!("../../../config/edge.toml");
        let example: toml::Table = toml::from_str(text).unwrap();
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        assert_eq!(toml::Value::Table(example), defaults, "config/edge.toml differs from defaults");
        assert_eq!(parse(text, "config/edge.toml", no_env()).unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = parse("[admin]\nlisten_adress = \"127.0.0.1:1\"\n", "x.toml", no_env())
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_adress"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
        let err = parse("[nosuch]\n", "x.toml", no_env()).unwrap_err().to_string();
        assert!(err.contains("nosuch"), "{err}");
    }

    #[test]
    fn invalid_values_are_refused_with_key() {
        let err = parse("[admin]\nlisten = \"not an address\"\n", "", no_env()).unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = parse("[site]\ntenant_id = \"a b\"\n", "", no_env()).unwrap_err();
        assert!(err.to_string().contains("site.tenant_id"), "{err}");
        let err = parse("[store]\ngroup_commit_max_batch = 0\n", "", no_env()).unwrap_err();
        assert!(err.to_string().contains("group_commit_max_batch"), "{err}");
        let err = parse("[log]\ntarget = \"syslog\"\n", "", no_env()).unwrap_err();
        assert!(err.to_string().contains("syslog"), "{err}");
        let err = parse("[dicom]\nae_title = \"A\\\\B\"\n", "", no_env()).unwrap_err();
        assert!(err.to_string().contains("dicom.ae_title"), "{err}");
        let err = parse("[dicom]\nmax_pdu_bytes = 100\n", "", no_env()).unwrap_err();
        assert!(err.to_string().contains("dicom.max_pdu_bytes"), "{err}");
        let err = parse("[dicom]\nduplicate_policy = \"overwrite\"\n", "", no_env()).unwrap_err();
        assert!(err.to_string().contains("overwrite"), "{err}");
        let text = "[[dicom.peers]]\nae_title = \"CT1\"\naddress = \"not-ip\"\n";
        let err = parse(text, "", no_env()).unwrap_err();
        assert!(err.to_string().contains("dicom.peers[0].address"), "{err}");
    }

    #[test]
    fn dicom_peers_are_move_destinations_with_defaults() {
        let text = r#"
            [dicom]
            peers = [
                { ae_title = "CT1", address = "10.0.0.5" },
                { ae_title = "PACS", address = "10.0.0.9", port = 4242 },
                { ae_title = "VNA", address = "::1", tls = true },
                { ae_title = "SECURE", address = "10.0.0.7", port = 11113, tls = true },
                { ae_title = "US" },
            ]
        "#;
        let c = parse(text, "", no_env()).unwrap();
        let d: Vec<Option<MoveDestination>> =
            c.dicom.peers.iter().map(DicomPeer::move_destination).collect();
        let dest = |a: &str, tls| Some(MoveDestination { addr: a.parse().unwrap(), tls });
        assert_eq!(d[0], dest("10.0.0.5:11112", false));
        assert_eq!(d[1], dest("10.0.0.9:4242", false));
        assert_eq!(d[2], dest("[::1]:2762", true));
        assert_eq!(d[3], dest("10.0.0.7:11113", true));
        assert_eq!(d[4], None, "no address: allowed to associate, not a destination");
        assert!(!c.dicom.peers[4].tls);
        // The effective config round-trips (check-config prints it).
        assert_eq!(parse(&c.to_toml(), "", no_env()).unwrap(), c);
        let err =
            parse("[[dicom.peers]]\nae_title = \"X\"\nport = 104\n", "", no_env()).unwrap_err();
        assert!(err.to_string().contains("dicom.peers[0].port"), "{err}");
        let text = "[[dicom.peers]]\nae_title = \"X\"\naddress = \"10.0.0.1\"\nport = 0\n";
        let err = parse(text, "", no_env()).unwrap_err();
        assert!(err.to_string().contains("dicom.peers[0].port"), "{err}");
        let text = "[[dicom.peers]]\nae_title = \"X\"\nport = \"x\"\n";
        assert!(parse(text, "", no_env()).is_err());
    }

    #[test]
    fn env_overrides_apply_with_types() {
        let env = vec![
            ("HMS_EDGE_ADMIN_LISTEN".to_string(), "127.0.0.1:19464".to_string()),
            ("HMS_EDGE_SITE_TENANT_ID".to_string(), "12345".to_string()),
            ("HMS_EDGE_KEYS_GENERATE_IF_MISSING".to_string(), "false".to_string()),
            ("HMS_EDGE_STORE_DB_READERS".to_string(), "2".to_string()),
            ("HMS_EDGE_CONFIG".to_string(), "/ignored".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let c = parse("[admin]\nlisten = \"127.0.0.1:1\"\n", "", env).unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:19464".parse().unwrap());
        assert_eq!(c.site.tenant_id, "12345");
        assert!(!c.keys.generate_if_missing);
        assert_eq!(c.store.db_readers, 2);
    }

    #[test]
    fn storage_limits_parse_and_are_checked() {
        let c = parse(
            "[storage]\nhigh_watermark = \"90%\"\nlow_watermark = \"80GiB\"\ncritical_free = \"2%\"\n",
            "",
            no_env(),
        )
        .unwrap();
        assert_eq!(c.storage.high_watermark, SpaceLimit::Share(9000));
        assert_eq!(c.storage.low_watermark, SpaceLimit::Bytes(80 << 30));
        assert_eq!(c.critical_free(), SpaceLimit::Share(200));
        let err = parse("[storage]\nlow_watermark = \"90%\"\n", "", no_env()).unwrap_err();
        assert!(err.to_string().contains("storage.low_watermark"), "{err}");
        let err = parse("[storage]\nrecords_reserve = \"2GiB\"\n", "", no_env()).unwrap_err();
        assert!(err.to_string().contains("storage.records_reserve"), "{err}");
        let err = parse("[storage]\ncritical_free = \"plenty\"\n", "", no_env()).unwrap_err();
        assert!(err.to_string().contains("plenty"), "{err}");
        // The deprecated key still works and wins, so an old edge.toml keeps its meaning (a
        // floor below the records reserve lowers the reserve with it: see the store's policy).
        let c = parse("[admin]\nmin_free_disk_mb = 2048\n", "", no_env()).unwrap();
        assert_eq!(c.critical_free(), SpaceLimit::Bytes(2 << 30));
        let c = parse("[admin]\nmin_free_disk_mb = 2\n", "", no_env()).unwrap();
        assert_eq!(c.critical_free(), SpaceLimit::Bytes(2 << 20));
        let env = vec![("HMS_EDGE_STORAGE_HIGH_WATERMARK".to_string(), "80%".to_string())];
        assert_eq!(parse("", "", env).unwrap().storage.high_watermark, SpaceLimit::Share(8000));
    }

    #[test]
    fn env_errors_name_the_variable() {
        let env = vec![("HMS_EDGE_ADMIN_LISTN".to_string(), "x".to_string())];
        let err = parse("", "", env).unwrap_err().to_string();
        assert!(err.contains("HMS_EDGE_ADMIN_LISTN") && err.contains("no such setting"), "{err}");
        let env = vec![("HMS_EDGE_STORE_DB_READERS".to_string(), "many".to_string())];
        let err = parse("", "", env).unwrap_err().to_string();
        assert!(err.contains("HMS_EDGE_STORE_DB_READERS") && err.contains("integer"), "{err}");
    }
}
