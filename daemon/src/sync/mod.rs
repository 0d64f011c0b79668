//! The daemon's half of upstream sync: the change log as a work queue (lease, acknowledge, fail,
//! park), pulled upstream data applied under a conflict policy, and the internal API on a Unix
//! socket that `hms-edge-agent` uses.
//!
//! Boundary (shared/DESIGN.md "why two processes"): the agent never opens the database and holds
//! no store key; this module holds no upstream credential and makes no outbound connection.
//! Everything the agent may do is a route in [`internal`]; the wire types are in [`api`], which
//! the agent links too.

pub mod apply;
pub mod internal;
pub mod outbox;

/// Schema for sync state (migration 5).
pub const MIGRATION: &str = r#"
    CREATE INDEX outbox_by_kind ON outbox (kind, state, seq);
    CREATE INDEX outbox_by_entity ON outbox (kind, entity);
    -- Last version the upstream server is known to hold for each resource (If-Match on push;
    -- echo detection on pull).
    CREATE TABLE sync_upstream (
        rtype            TEXT NOT NULL,
        id               TEXT NOT NULL,
        upstream_version TEXT NOT NULL,
        PRIMARY KEY (rtype, id)
    ) STRICT;
    -- Every conflict, resolved or not: which side lost and what it held.
    CREATE TABLE sync_conflicts (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        at               INTEGER NOT NULL,
        entity           TEXT NOT NULL,
        policy           TEXT NOT NULL,
        state            TEXT NOT NULL,
        local_version    INTEGER,
        upstream_version TEXT,
        upstream_json    TEXT,
        resolution       TEXT,
        resolved_at      INTEGER
    ) STRICT;
    CREATE INDEX sync_conflicts_by_state ON sync_conflicts (state, id);
"#;

pub use hms_edge_wire::{
    SITE_SOURCE_PREFIX, SOCKET_NAME, TENANT_TAG_SYSTEM, api, client, content_of, socket_path,
    tenant_of,
};
