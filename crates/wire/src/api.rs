//! Wire types of the internal API (JSON over HTTP/1.1 on the Unix socket). Shared with the agent.

use serde::{Deserialize, Serialize};

/// Change-log channels the agent consumes independently (one stuck channel never blocks another).
pub const CHANNELS: &[&str] = &["fhir", "dicom", "event", "recall"];

/// `POST /v1/outbox/lease`: take up to `max` due changes of one channel for `lease_secs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub kind: String,
    pub max: u32,
    pub lease_secs: u32,
}

/// One leased change. For FHIR, `resource` is the *current* version (or `None` when deleted), so
/// a burst of changes to one resource is pushed once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeasedChange {
    pub seq: i64,
    pub created_at_ms: i64,
    pub entity: String,
    pub op: String,
    pub version: Option<String>,
    pub attempts: i64,
    #[serde(default)]
    pub detail: Option<serde_json::Value>,
    /// FHIR: the current local version number.
    #[serde(default)]
    pub current_version: Option<i64>,
    /// FHIR: the current resource (None: deleted).
    #[serde(default)]
    pub resource: Option<serde_json::Value>,
    /// FHIR: the version the upstream server is known to hold (for `If-Match`).
    #[serde(default)]
    pub upstream_version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseResponse {
    pub entries: Vec<LeasedChange>,
}

/// One acknowledged change. For FHIR, `pushed_version` also retires older changes of the same
/// resource (they were squashed into this push) and `upstream_version` is what upstream now holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AckItem {
    pub seq: i64,
    #[serde(default)]
    pub pushed_version: Option<i64>,
    #[serde(default)]
    pub upstream_version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AckRequest {
    pub kind: String,
    pub items: Vec<AckItem>,
}

/// A failed attempt: retried after `retry_after_secs`, or parked (kept, reported, not retried
/// until site IT asks) when `park`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailItem {
    pub seq: i64,
    pub error: String,
    #[serde(default)]
    pub park: bool,
    #[serde(default)]
    pub retry_after_secs: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailRequest {
    pub kind: String,
    pub items: Vec<FailItem>,
}

/// Counts returned by ack/fail/release.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Affected {
    pub affected: u64,
}

/// How a conflict between an edge change and an upstream change ends.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// Upstream's version is applied; the local one stays in history and is recorded.
    #[default]
    ServerWins,
    /// The local version is pushed over upstream's, whose content is recorded.
    ClientWins,
    /// Both kept; the local change is parked until site IT resolves it.
    Manual,
}

impl ConflictPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::ServerWins => "server-wins",
            ConflictPolicy::ClientWins => "client-wins",
            ConflictPolicy::Manual => "manual",
        }
    }
}

/// `POST /v1/fhir/apply`: an upstream version (or delete) of one resource.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyRequest {
    pub rtype: String,
    pub id: String,
    /// None: deleted upstream.
    pub resource: Option<serde_json::Value>,
    pub upstream_version: String,
    pub policy: ConflictPolicy,
}

/// What applying did.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ApplyOutcome {
    /// Written into the cache (origin upstream; not echoed back).
    Applied,
    /// Upstream already matches the edge (an echo of our own push, a replayed page).
    Unchanged,
    /// Conflict resolved by policy; see the conflict record.
    ConflictServerWins,
    ConflictClientWins,
    ConflictHeld,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub outcome: ApplyOutcome,
    #[serde(default)]
    pub conflict_id: Option<i64>,
}

/// A recorded conflict (`GET /v1/conflicts`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Conflict {
    pub id: i64,
    pub at_ms: i64,
    pub entity: String,
    pub policy: String,
    /// `open` (manual, waiting) or `resolved`.
    pub state: String,
    pub local_version: Option<i64>,
    pub upstream_version: Option<String>,
    pub resolution: Option<String>,
}

/// `POST /v1/conflicts/{id}/resolve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolveRequest {
    /// `local` (push the edge version over upstream's) or `upstream` (take upstream's).
    pub keep: String,
}

/// Per-channel queue figures (`GET /v1/status`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ChannelStatus {
    pub kind: String,
    pub pending: u64,
    pub leased: u64,
    pub parked: u64,
    /// Age of the oldest change not yet acknowledged, in ms.
    pub oldest_age_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct StatusResponse {
    pub tenant_id: String,
    pub site_id: String,
    pub channels: Vec<ChannelStatus>,
    pub open_conflicts: u64,
    /// What the agent last reported per channel (last success, bytes sent, link state…).
    pub agent: serde_json::Map<String, serde_json::Value>,
}

/// A parked change as listed for site IT.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ParkedChange {
    pub seq: i64,
    pub kind: String,
    pub entity: String,
    pub op: String,
    pub attempts: i64,
    pub last_error: Option<String>,
}

/// `POST /v1/events`: an event for the broker, kept in the durable change log until published.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRequest {
    /// `sync.progress`, `sync.conflict`, `health`, … (never PHI).
    pub event: String,
    pub payload: serde_json::Value,
}
