//! What crosses the boundary between `hms-edged` and `hms-edge-agent`: the internal API's
//! request and response types ([`api`]), its Unix-socket client ([`client`]), the anchor
//! documents ([`anchor`]), and the few conventions both sides must agree on.
//!
//! Boundary (shared/DESIGN.md "why two processes"): this crate is the only code of ours the agent
//! links. It has no database, no store key and no SQLCipher; `cargo tree -p hms-edge-agent`
//! shows it.

use std::path::{Path, PathBuf};

pub mod anchor;
pub mod api;
#[cfg(feature = "client")]
pub mod client;

/// `meta.tag` system that names the tenant on every resource pushed upstream.
pub const TENANT_TAG_SYSTEM: &str = "urn:hms-edge:tenant";

/// `meta.source` prefix naming the site a resource was written at.
pub const SITE_SOURCE_PREFIX: &str = "urn:hms-edge:site:";

/// Socket file name under the runtime (or, in development, the state) folder.
pub const SOCKET_NAME: &str = "agent.sock";

/// The tenant a resource's tags name, if any.
pub fn tenant_of(resource: &serde_json::Value) -> Option<&str> {
    resource.pointer("/meta/tag")?.as_array()?.iter().find_map(|t| {
        (t.get("system")?.as_str()? == TENANT_TAG_SYSTEM).then(|| t.get("code")?.as_str())?
    })
}

/// A resource without its `meta` (version, timestamps, tags): what "same content" compares.
pub fn content_of(resource: &serde_json::Value) -> serde_json::Value {
    let mut v = resource.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("meta");
        o.remove("text");
    }
    v
}

/// The socket path: configured, else `$RUNTIME_DIRECTORY/agent.sock` under systemd, else beside
/// the state folder's database.
pub fn socket_path(configured: &Path, state_dir: &Path) -> PathBuf {
    if !configured.as_os_str().is_empty() {
        return configured.to_owned();
    }
    match std::env::var_os("RUNTIME_DIRECTORY") {
        Some(d) => {
            PathBuf::from(d.to_string_lossy().split(':').next().unwrap_or("")).join(SOCKET_NAME)
        }
        None => state_dir.join(SOCKET_NAME),
    }
}
